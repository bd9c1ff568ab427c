/// Reading and weakening ELF symbol-version requirements.
///
/// TorchSharp 0.107's `libLibTorchSharp.so` requires `GLIBCXX_3.4.32` from libstdc++ only for
/// `std::ios_base_library_init`, which nothing calls. Debian 12's libstdc++ stops at 3.4.30, so the
/// dynamic loader refuses the library (and TorchSharp reports a misleading "missing libtorch-cpu
/// package" error). Marking that one version requirement weak (`VER_FLG_WEAK` in its `Vernaux`
/// entry) lets the loader accept it. This module has no dependency but the BCL, so the build step
/// (build/PatchNative) compiles the same file.
module Transcoders.Native.ElfVerneed

open System
open System.IO
open System.Text

/// `VER_FLG_WEAK` in `vna_flags` (elf.h).
[<Literal>]
let VerFlagWeak = 0x2us

[<Literal>]
let private ShtGnuVerdef = 0x6ffffffdu

[<Literal>]
let private ShtGnuVerneed = 0x6ffffffeu

/// What `weaken` did, or why it did nothing.
type Outcome =
    /// The file is not a 64-bit little-endian ELF file; it was left untouched.
    | NotElf64
    /// The file has no requirement of that version from that library; it was left untouched.
    | NoSuchRequirement
    /// The requirement was weak already; the file was left untouched.
    | AlreadyWeak
    /// The requirement's flags were changed to include `VER_FLG_WEAK`.
    | Weakened

type private Section = { Type: uint32; Offset: int; Size: int; Link: int }

let private u16 (b: byte[]) (o: int) = BitConverter.ToUInt16(b, o)
let private u32 (b: byte[]) (o: int) = BitConverter.ToUInt32(b, o)
let private u64 (b: byte[]) (o: int) = BitConverter.ToUInt64(b, o)

let private isElf64Le (b: byte[]) =
    b.Length >= 64 && b[0] = 0x7fuy && b[1] = byte 'E' && b[2] = byte 'L' && b[3] = byte 'F'
    && b[4] = 2uy (* ELFCLASS64 *) && b[5] = 1uy (* ELFDATA2LSB *)

let private sections (b: byte[]) =
    let shoff = u64 b 0x28
    let shentsize = int (u16 b 0x3A)
    let shnum = int (u16 b 0x3C)
    if shoff = 0UL || shentsize < 64 || shoff + uint64 (shnum * shentsize) > uint64 b.Length then
        [||]
    else
        [| for i in 0 .. shnum - 1 ->
               let h = int shoff + i * shentsize
               { Type = u32 b (h + 4)
                 Offset = int (u64 b (h + 0x18))
                 Size = int (u64 b (h + 0x20))
                 Link = int (u32 b (h + 0x28)) } |]

let private cstring (b: byte[]) (start: int) =
    if start < 0 || start >= b.Length then ""
    else
        let e = Array.IndexOf(b, 0uy, start)
        Encoding.ASCII.GetString(b, start, (if e < 0 then b.Length else e) - start)

/// Offsets (into the file) of the `vna_flags` fields of every requirement of `version` from `library`.
/// A malformed file (offsets outside it) yields no offsets rather than an exception.
let private requirementFlagOffsets (b: byte[]) (library: string) (version: string) =
  try
    let secs = sections b
    [ for s in secs do
          if s.Type = ShtGnuVerneed && s.Link < secs.Length then
              let strtab = secs[s.Link].Offset
              let mutable vn = s.Offset
              let mutable go = s.Size >= 16
              while go && vn + 16 <= b.Length do
                  let cnt = int (u16 b (vn + 2))
                  let file = cstring b (strtab + int (u32 b (vn + 4)))
                  let mutable aux = vn + int (u32 b (vn + 8))
                  for _ in 1..cnt do
                      if aux + 16 <= b.Length then
                          if file = library && cstring b (strtab + int (u32 b (aux + 8))) = version then
                              yield aux + 4 // vna_flags (after vna_hash)
                          aux <- aux + int (u32 b (aux + 12))
                  let next = int (u32 b (vn + 12))
                  if next <= 0 then go <- false else vn <- vn + next ]
  with :? System.ArgumentException | :? System.IndexOutOfRangeException | :? System.OverflowException -> []

/// The version names a shared library defines (its `.gnu.version_d`), e.g. GLIBCXX_3.4.30.
let definedVersions (path: string) : Set<string> =
    let b = File.ReadAllBytes path
    if not (isElf64Le b) then Set.empty
    else
      try
        let secs = sections b
        set [ for s in secs do
                  if s.Type = ShtGnuVerdef && s.Link < secs.Length then
                      let strtab = secs[s.Link].Offset
                      let mutable vd = s.Offset
                      let mutable go = s.Size >= 20
                      while go && vd + 20 <= b.Length do
                          let aux = vd + int (u32 b (vd + 12))
                          if aux + 8 <= b.Length then yield cstring b (strtab + int (u32 b aux))
                          let next = int (u32 b (vd + 16))
                          if next <= 0 then go <- false else vd <- vd + next ]
      with :? System.ArgumentException | :? System.IndexOutOfRangeException | :? System.OverflowException -> Set.empty

/// Whether the ELF file at `path` requires `version` of `library` weakly (Some true), strongly
/// (Some false), or not at all (None, also for files that are not ELF64).
let requirementIsWeak (path: string) (library: string) (version: string) : bool option =
    let b = File.ReadAllBytes path
    if not (isElf64Le b) then None
    else
        match requirementFlagOffsets b library version with
        | [] -> None
        | offsets -> Some(offsets |> List.forall (fun o -> u16 b o &&& VerFlagWeak <> 0us))

/// Marks every requirement of `version` from `library` in the ELF file at `path` weak. Idempotent;
/// files that are not ELF64 or lack the requirement are left untouched. The file is replaced
/// atomically (written to a temporary file, then renamed), which also breaks any hard link to it,
/// so a shared copy (the NuGet cache) is never modified through a link.
let weaken (path: string) (library: string) (version: string) : Outcome =
    let b = File.ReadAllBytes path
    if not (isElf64Le b) then NotElf64
    else
        match requirementFlagOffsets b library version with
        | [] -> NoSuchRequirement
        | offsets ->
            let strong = offsets |> List.filter (fun o -> u16 b o &&& VerFlagWeak = 0us)
            if strong.IsEmpty then AlreadyWeak
            else
                for o in strong do
                    let flags = u16 b o ||| VerFlagWeak
                    b[o] <- byte (flags &&& 0xFFus)
                    b[o + 1] <- byte (flags >>> 8)
                let tmp = path + ".patching"
                File.WriteAllBytes(tmp, b)
                try
                    File.SetUnixFileMode(tmp, File.GetUnixFileMode path)
                with _ -> ()
                File.Move(tmp, path, true)
                Weakened

/// The libstdc++ the dynamic loader would pick: LD_LIBRARY_PATH first, then the usual system folders.
let systemLibStdCxx () : string option =
    let fromEnv =
        match Environment.GetEnvironmentVariable "LD_LIBRARY_PATH" with
        | null | "" -> []
        | p -> p.Split(':', StringSplitOptions.RemoveEmptyEntries) |> List.ofArray
    let system =
        [ "/lib/x86_64-linux-gnu"; "/usr/lib/x86_64-linux-gnu"; "/lib64"; "/usr/lib64"; "/lib"; "/usr/lib"
          "/lib/aarch64-linux-gnu"; "/usr/lib/aarch64-linux-gnu" ]
    fromEnv @ system
    |> List.map (fun d -> Path.Combine(d, "libstdc++.so.6"))
    |> List.tryFind File.Exists

/// The one requirement this project weakens: TorchSharp's glue asks libstdc++ for this version only
/// for a symbol nothing calls.
let TorchSharpLibrary = "libstdc++.so.6"
let TorchSharpVersion = "GLIBCXX_3.4.32"

/// Whether the system's libstdc++ lacks the version TorchSharp's glue asks for (false when unknown:
/// a system we cannot read is left alone).
let systemNeedsPatch () =
    match systemLibStdCxx () with
    | Some lib -> not (definedVersions lib |> Set.contains TorchSharpVersion)
    | None -> false

/// Applies the fix to every `libLibTorchSharp.so` under `folder` when the system needs it.
/// Returns each file with what was done to it.
let patchFolder (folder: string) : (string * Outcome) list =
    if not (Directory.Exists folder) || not (systemNeedsPatch ()) then []
    else
        [ for f in Directory.EnumerateFiles(folder, "libLibTorchSharp.so", SearchOption.AllDirectories) ->
              f, weaken f TorchSharpLibrary TorchSharpVersion ]
