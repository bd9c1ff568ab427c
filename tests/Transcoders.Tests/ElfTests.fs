/// The Debian-12 fix: weakening one ELF version requirement, on crafted files and on the real glue.
module Transcoders.Tests.ElfTests

open System
open System.IO
open System.Text
open Expecto
open Transcoders.Native
open Transcoders.Tests.Fixtures

/// A minimal ELF64 shared object: header, .dynstr, .gnu.version_r and a section header table.
/// `needs` lists (library, [versions]) requirements.
let craftElf (needs: (string * string list) list) =
    let strtab = ResizeArray<byte>([ 0uy ])
    let str (s: string) =
        let o = strtab.Count
        strtab.AddRange(Encoding.ASCII.GetBytes s)
        strtab.Add 0uy
        o
    let verneed = ResizeArray<byte>()
    let put16 (v: int) = verneed.AddRange(BitConverter.GetBytes(uint16 v))
    let put32 (v: int) = verneed.AddRange(BitConverter.GetBytes(uint32 v))
    needs |> List.iteri (fun i (lib, versions) ->
        let last = i = needs.Length - 1
        put16 1; put16 versions.Length; put32 (str lib); put32 16
        put32 (if last then 0 else 16 + 16 * versions.Length)
        versions |> List.iteri (fun j v ->
            put32 (0x0b792650 + j); put16 0; put16 (2 + j); put32 (str v)
            put32 (if j = versions.Length - 1 then 0 else 16)))
    let dynstrOff = 64
    let verneedOff = dynstrOff + strtab.Count
    let shoff = (verneedOff + verneed.Count + 7) / 8 * 8
    let file = Array.zeroCreate<byte> (shoff + 3 * 64)
    Array.blit [| 0x7fuy; byte 'E'; byte 'L'; byte 'F'; 2uy; 1uy; 1uy |] 0 file 0 7
    let w16 (o: int) (v: int) = BitConverter.GetBytes(uint16 v).CopyTo(file, o)
    let w32 (o: int) (v: int) = BitConverter.GetBytes(uint32 v).CopyTo(file, o)
    let w64 (o: int) (v: int) = BitConverter.GetBytes(uint64 v).CopyTo(file, o)
    w16 0x10 3; w16 0x12 62; w32 0x14 1; w64 0x28 shoff; w16 0x34 64; w16 0x3A 64; w16 0x3C 3; w16 0x3E 1
    strtab.CopyTo(file, dynstrOff)
    verneed.CopyTo(file, verneedOff)
    let sh i typ off size link info =
        let h = shoff + i * 64
        w32 (h + 4) typ; w64 (h + 0x18) off; w64 (h + 0x20) size; w32 (h + 0x28) link; w32 (h + 0x2C) info
    sh 1 3 dynstrOff strtab.Count 0 0
    sh 2 0x6ffffffe verneedOff verneed.Count 1 needs.Length
    file

let private lib = ElfVerneed.TorchSharpLibrary
let private ver = ElfVerneed.TorchSharpVersion

let private withFile (bytes: byte[]) f =
    use dir = new TempDir()
    let path = dir.File "lib.so"
    File.WriteAllBytes(path, bytes)
    f path

let tests =
    testList "ELF verneed (Debian 12 fix)" [
        test "weakens exactly the requested requirement, and is idempotent" {
            let elf = craftElf [ "libc.so.6", [ "GLIBC_2.2.5" ]; lib, [ "GLIBCXX_3.4"; ver; "CXXABI_1.3" ] ]
            withFile elf (fun path ->
                Expect.equal (ElfVerneed.requirementIsWeak path lib ver) (Some false) "strong before"
                Expect.equal (ElfVerneed.weaken path lib ver) ElfVerneed.Weakened "first patch"
                Expect.equal (ElfVerneed.requirementIsWeak path lib ver) (Some true) "weak after"
                let after = File.ReadAllBytes path
                let changed = [ for i in 0 .. elf.Length - 1 do if elf[i] <> after[i] then yield i ]
                Expect.equal changed.Length 1 "one byte changed (the low byte of vna_flags)"
                Expect.equal after[changed.Head] (elf[changed.Head] ||| 2uy) "VER_FLG_WEAK set"
                for other in [ "GLIBCXX_3.4"; "CXXABI_1.3" ] do
                    Expect.equal (ElfVerneed.requirementIsWeak path lib other) (Some false) (other + " untouched")
                Expect.equal (ElfVerneed.weaken path lib ver) ElfVerneed.AlreadyWeak "second patch does nothing"
                Expect.equal (File.ReadAllBytes path) after "idempotent: bytes unchanged")
        }
        test "an ELF without that requirement is left untouched" {
            let elf = craftElf [ "libc.so.6", [ "GLIBC_2.2.5"; "GLIBC_2.14" ]; lib, [ "GLIBCXX_3.4" ] ]
            withFile elf (fun path ->
                Expect.equal (ElfVerneed.weaken path lib ver) ElfVerneed.NoSuchRequirement "nothing to do"
                Expect.equal (File.ReadAllBytes path) elf "bytes unchanged")
        }
        test "the same version name from another library is not touched" {
            let elf = craftElf [ "libother.so.1", [ ver ] ]
            withFile elf (fun path ->
                Expect.equal (ElfVerneed.weaken path lib ver) ElfVerneed.NoSuchRequirement "other library"
                Expect.equal (File.ReadAllBytes path) elf "bytes unchanged")
        }
        testProperty "arbitrary bytes never throw and are never modified unless patched" <| fun (bytes: byte[]) (elfMagic: bool) ->
            let bytes =
                if elfMagic && bytes.Length >= 8 then
                    Array.append [| 0x7fuy; byte 'E'; byte 'L'; byte 'F'; 2uy; 1uy |] bytes
                else bytes
            withFile bytes (fun path ->
                match ElfVerneed.weaken path lib ver with
                | ElfVerneed.Weakened -> true
                | _ -> File.ReadAllBytes path = bytes)
        test "the built libLibTorchSharp.so loads on this system" {
            let here = AppContext.BaseDirectory
            let copies = Directory.GetFiles(here, "libLibTorchSharp.so", SearchOption.AllDirectories)
            Expect.isNonEmpty copies "the build copies TorchSharp's glue into the output"
            for so in copies do
                let weak = ElfVerneed.requirementIsWeak so lib ver
                if ElfVerneed.systemNeedsPatch () then
                    Expect.equal weak (Some true) (so + ": requirement weakened where the system lacks " + ver)
        }
    ]
