/// TorchSharp loads and computes on this machine.
module Transcoders.Tests.TorchTests

open Expecto
open TorchSharp
open Transcoders.Tensors

let tests =
    testList "TorchSharp" [
        test "loads and computes a matmul that matches a hand computation" {
            Device.init ()
            use a = torch.tensor([| 1.0f; 2.0f; 3.0f; 4.0f |]).reshape(2L, 2L)
            use b = torch.tensor([| 5.0f; 6.0f; 7.0f; 8.0f |]).reshape(2L, 2L)
            use c = a.matmul b
            Expect.sequenceEqual (c.data<float32>().ToArray()) [| 19.0f; 22.0f; 43.0f; 50.0f |] "[[1,2],[3,4]]·[[5,6],[7,8]]"
        }
        // sequenced: torch's global generator is shared with every test running in parallel
        testSequenced <| test "seeding makes random draws reproducible" {
            Device.seed 42L
            use x = torch.randn(5L)
            Device.seed 42L
            use y = torch.randn(5L)
            Expect.isTrue (x.eq(y).all().item<bool>()) "same seed, same draws"
        }
    ]
