namespace Transcoders.Activations

open System

/// Which hooks one coder reads (inputs) and reconstructs (targets). An SAE reads and reconstructs one
/// hook; a transcoder reads the MLP input and predicts the MLP output; a cross-layer transcoder reads
/// every layer's MLP input and predicts every layer's MLP output.
type CoderHooks =
    { Coder: string
      Inputs: string list
      Targets: string list }

/// Constructors for the usual coders.
module CoderHooks =
    /// A sparse autoencoder on `hook`.
    let sae (coder: string) (hook: string) = { Coder = coder; Inputs = [ hook ]; Targets = [ hook ] }

    /// A (skip) transcoder from `input` to `target`, e.g. blocks.8.ln2.hook_normalized -> blocks.8.hook_mlp_out.
    let transcoder (coder: string) (input: string) (target: string) =
        { Coder = coder; Inputs = [ input ]; Targets = [ target ] }

    /// A cross-layer transcoder reading `inputs` (one per layer) and writing `targets`.
    let crossLayer (coder: string) (inputs: string list) (targets: string list) =
        { Coder = coder; Inputs = inputs; Targets = targets }

    /// The coder's input rows in `batch`, in `Inputs` order.
    let inputs (c: CoderHooks) (batch: Batch) = c.Inputs |> List.map (fun h -> Batch.hook h batch)

    /// The coder's target rows in `batch`, in `Targets` order.
    let targets (c: CoderHooks) (batch: Batch) = c.Targets |> List.map (fun h -> Batch.hook h batch)

/// The coders one model pass feeds. Each hook is cached, buffered and stored once, however many coders use it.
type ActivationSpec =
    { Coders: CoderHooks list }

    /// Every hook some coder uses, each once, in order of first use.
    member s.Hooks = s.Coders |> List.collect (fun c -> c.Inputs @ c.Targets) |> List.distinct

    /// Fails with a message naming the fault: no coders, duplicate coder names, a coder without inputs
    /// or targets, an empty hook name.
    member s.Validate() =
        if s.Coders.IsEmpty then invalidArg "Coders" "the activation spec names no coders"
        let duplicates = s.Coders |> List.countBy (fun c -> c.Coder) |> List.filter (fun (_, n) -> n > 1)
        if not duplicates.IsEmpty then
            invalidArg "Coders" (sprintf "coder name '%s' appears more than once" (fst duplicates.Head))
        for c in s.Coders do
            if String.IsNullOrWhiteSpace c.Coder then invalidArg "Coders" "a coder has an empty name"
            if c.Inputs.IsEmpty then invalidArg "Coders" (sprintf "coder '%s' has no input hooks" c.Coder)
            if c.Targets.IsEmpty then invalidArg "Coders" (sprintf "coder '%s' has no target hooks" c.Coder)
            for h in c.Inputs @ c.Targets do
                if String.IsNullOrWhiteSpace h then invalidArg "Coders" (sprintf "coder '%s' names an empty hook" c.Coder)
