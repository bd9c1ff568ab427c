namespace Transcoders.Coders

open System
open System.Collections.Generic
open TorchSharp
open Transcoders.Coders.Scalars
open TorchSharp.Modules

/// The sparse code of a pass with exactly k candidates per token (TopK, GroupMax): `Indices` (int64) and
/// `Values` (≥ 0, zero where a candidate did not fire), both [L, B, k]. (A prompt's active features as circuits see
/// them are `Circuits.ActiveFeatures`.)
type SparseCode =
    { Indices: torch.Tensor
      Values: torch.Tensor }

/// One forward pass in layer-major layout and normalised units: `Pre` and `Acts` are [L, B, d_sae],
/// `Prediction` is [L, B, d_out]. `BatchMinKept` ([L]) is set for BatchTopK: the smallest positive kept value.
/// `Active` is set when the pass decoded sparsely (`ComputeOptions.SparseDecode`).
type CoderPass =
    { Pre: torch.Tensor
      Acts: torch.Tensor
      Prediction: torch.Tensor
      BatchMinKept: torch.Tensor option
      Active: SparseCode option }

/// How a forward pass computes; not part of the coder (nothing here is saved, and every choice gives the same
/// function up to rounding).
type ComputeOptions =
    { /// dtype of the encoder and dense-decoder matrix products. Parameters stay float32 (master weights): with
      /// BFloat16 or Float16 the inputs and weights are cast for each product, like autocast; pre-activations and
      /// activations are then in this dtype, predictions and losses in float32.
      Dtype: torch.ScalarType
      /// TopK and GroupMax coders: decode only the k active features of each token (a sparse product over the
      /// decoder rows, with a sparse backward) instead of the dense [B, d_sae]·W_dec product. Pays when d_sae/k is large.
      SparseDecode: bool }

    /// float32, dense decoding.
    static member Default = { Dtype = torch.float32; SparseDecode = false }

/// The coder's affine encoder, the one formula every caller uses (training, splicing, attribution): pre-activations
/// (x_n − b_in)·W_enc + b_enc of inputs already multiplied by the input scale, computed in `dtype` (the input
/// bias is subtracted before the cast). Shapes broadcast: layer-major [L, B, d_in] with W_enc [L, d_in, d_sae] and
/// biases [L, 1, ·]; rows [N, d_in] with one layer's W_enc [d_in, k]; one vector [d_in] with one feature's column.
[<RequireQualifiedAccess>]
module Encoder =
    let preActivations (dtype: torch.ScalarType) (inputBias: torch.Tensor option) (wEnc: torch.Tensor) (bEnc: torch.Tensor) (xn: torch.Tensor) : torch.Tensor =
        use xc = match inputBias with Some b -> xn.sub b | None -> xn.alias()
        if xc.dtype = dtype && wEnc.dtype = dtype then
            use xw = xc.matmul wEnc
            xw.add bEnc
        else
            use xd = xc.to_type dtype
            use wd = wEnc.to_type dtype
            use xw = xd.matmul wd
            use bd = bEnc.to_type dtype
            xw.add bd

/// A sparse coder (SAE, transcoder, skip transcoder or cross-layer transcoder) with its parameters.
///
/// Parameters are held layer-major whatever the kind (L = 1 except for a cross-layer transcoder):
/// `W_enc` [L, d_in, d_sae], `b_enc` [L, d_sae], `log_threshold` [L, d_sae] (JumpReLU), `W_dec_{l}` [d_sae, L−l, d_out]
/// (decoder of layer l's features to layers l..L−1), `b_dec` [L, d_out], `b_in` [L, d_in] (transcoders with an input
/// bias), `W_skip` [L, d_out, d_in] (skip transcoder). BatchTopK coders also carry a running threshold estimate
/// `batchtopk_threshold` [L] (not trained). The file format (`CoderFile`) maps these onto SAELens-style keys.
///
/// Encode: a = σ((x·s_in − b_in)·W_enc + b_enc); decode: ŷ_ℓ' = (Σ_{ℓ≤ℓ'} a_ℓ·W_dec^{ℓ→ℓ'} + W_skip·x·s_in + b_dec_ℓ') / s_out,
/// where b_in is `b_dec` for an SAE with `InputBias`, and s are the configured activation scales.
type Coder internal (config: CoderConfig, tensors: IDictionary<string, torch.Tensor>, device: torch.Device) =
    let mutable config = config
    let nL = config.NLayers
    let toParam (name: string) =
        match tensors.TryGetValue name with
        | true, t ->
            let p = new Parameter(t, true)
            p.DetachFromDisposeScope() |> ignore
            p
        | _ -> invalidArg "tensors" (sprintf "coder parameter '%s' is missing" name)
    let wEnc = toParam "W_enc"
    let bEnc = toParam "b_enc"
    let logThreshold = match config.Activation with JumpReLU _ -> Some(toParam "log_threshold") | _ -> None
    let wDec = Array.init nL (fun l -> toParam (sprintf "W_dec_%d" l))
    let bDec = toParam "b_dec"
    let bIn = if config.InputBias && config.Kind <> Sae then Some(toParam "b_in") else None
    let wSkip = if config.Kind = SkipTranscoder then Some(toParam "W_skip") else None
    let batchTopKThreshold =
        match config.Activation with
        | BatchTopK _ ->
            let t =
                match tensors.TryGetValue "batchtopk_threshold" with
                | true, t -> t
                | _ -> torch.full([| int64 nL |], sc Double.NaN, dtype = torch.float32, device = device)
            t.DetachFromDisposeScope() |> ignore
            Some t
        | _ -> None
    let named =
        [ yield "W_enc", wEnc
          yield "b_enc", bEnc
          match logThreshold with Some p -> yield "log_threshold", p | None -> ()
          for l in 0 .. nL - 1 do yield sprintf "W_dec_%d" l, wDec[l]
          yield "b_dec", bDec
          match bIn with Some p -> yield "b_in", p | None -> ()
          match wSkip with Some p -> yield "W_skip", p | None -> () ]

    let scaleTensor (s: float[]) =
        torch.tensor(s |> Array.map float32, device = device).reshape(int64 nL, 1L, 1L)

    let checkLast (what: string) (x: torch.Tensor) (d: int) =
        if x.dim() < 1L || x.shape[int (x.dim()) - 1] <> int64 d then
            invalidArg what (sprintf "%s: last dimension must be %d (got shape %A)" what d x.shape)

    /// The expected (name, shape) of every parameter and buffer of a config, in layer-major layout.
    static member ParameterShapes(c: CoderConfig) : (string * int64[]) list =
        let nL, dIn, dOut, dSae = int64 c.NLayers, int64 c.DIn, int64 c.DOut, int64 c.DSae
        [ yield "W_enc", [| nL; dIn; dSae |]
          yield "b_enc", [| nL; dSae |]
          match c.Activation with JumpReLU _ -> yield "log_threshold", [| nL; dSae |] | _ -> ()
          for l in 0 .. c.NLayers - 1 do yield sprintf "W_dec_%d" l, [| dSae; nL - int64 l; dOut |]
          yield "b_dec", [| nL; dOut |]
          if c.InputBias && c.Kind <> Sae then yield "b_in", [| nL; dIn |]
          if c.Kind = SkipTranscoder then yield "W_skip", [| nL; dOut; dIn |]
          match c.Activation with BatchTopK _ -> yield "batchtopk_threshold", [| nL |] | _ -> () ]

    member _.Config = config
    member _.Device = device
    member _.NLayers = nL
    /// Trainable parameters with their names, in a fixed order.
    member _.NamedParameters : (string * Parameter) list = named
    member _.Parameters : Parameter list = named |> List.map snd
    member _.Item(name: string) : Parameter =
        match named |> List.tryFind (fun (n, _) -> n = name) with
        | Some(_, p) -> p
        | None -> invalidArg "name" (sprintf "this %s has no parameter '%s' (it has %s)" (CoderConfig.kindName config.Kind) name (String.Join(", ", named |> List.map fst)))
    member _.WEnc = wEnc
    member _.BEnc = bEnc
    member _.LogThreshold = logThreshold
    member _.WDec = wDec
    member _.BDec = bDec
    member _.BIn = bIn
    /// What is subtracted from the (scaled) input before encoding, [L, d_in]: `b_dec` for an SAE with an input bias
    /// (SAELens' apply_b_dec_to_input), `b_in` for a transcoder with one; None without.
    member _.InputBias : torch.Tensor option =
        if not config.InputBias then None
        elif config.Kind = Sae then Some(bDec :> torch.Tensor)
        else bIn |> Option.map (fun p -> p :> torch.Tensor)
    member _.WSkip = wSkip
    /// The running BatchTopK threshold estimate [L] (NaN until the first training step), for BatchTopK coders.
    member _.BatchTopKThreshold = batchTopKThreshold

    /// Changes the run-time activation scales (after estimating them from data).
    member _.SetScale(scale: ActivationScale) =
        config <- CoderConfig.validate { config with Scale = scale }

    /// JumpReLU thresholds θ = exp(log θ) [L, d_sae].
    member _.Threshold : torch.Tensor option = logThreshold |> Option.map (fun p -> p.exp())

    /// ‖W_dec,i‖ per feature [L, d_sae]: the norm of the concatenation of all decoders of feature i (differentiable).
    member _.DecoderNorms() : torch.Tensor =
        let norms = wDec |> Array.map (fun w -> w.pow(sc 2.0).sum([| 1L; 2L |]).sqrt())
        if nL = 1 then norms[0].unsqueeze 0 else torch.stack(norms, 0)

    /// Converts a user-layout tensor ([..., d] or, for a cross-layer transcoder, [..., L, d]) to layer-major [L, N, d].
    member _.ToLayerMajor(x: torch.Tensor, d: int, what: string) : torch.Tensor =
        checkLast what x d
        if config.Kind = CrossLayerTranscoder then
            if x.dim() < 2L || x.shape[int (x.dim()) - 2] <> int64 nL then
                invalidArg what (sprintf "%s: a cross-layer transcoder over %d layers expects [..., %d, %d] (got shape %A)" what nL nL d x.shape)
            x.reshape(-1L, int64 nL, int64 d).transpose(0, 1)
        else x.reshape(1L, -1L, int64 d)

    /// Converts a layer-major [L, N, d] tensor back to the user layout with the given leading shape.
    member _.FromLayerMajor(t: torch.Tensor, leading: int64[]) : torch.Tensor =
        let d = t.shape[2]
        if config.Kind = CrossLayerTranscoder then t.transpose(0, 1).reshape(Array.append leading [| int64 nL; d |])
        else t.reshape(Array.append leading [| d |])

    /// The leading (token) shape of a user-layout input.
    member _.LeadingShape(x: torch.Tensor) : int64[] =
        let drop = if config.Kind = CrossLayerTranscoder then 2 else 1
        x.shape[.. int (x.dim()) - 1 - drop]

    /// Multiplies layer-major inputs by the input scale (identity when the scale is 1).
    member _.NormaliseIn(x: torch.Tensor) : torch.Tensor =
        if config.Scale.In |> Array.forall ((=) 1.0) then x.alias() else (use s = scaleTensor config.Scale.In in x.mul s)
    /// Multiplies layer-major targets by the output scale.
    member _.NormaliseOut(y: torch.Tensor) : torch.Tensor =
        if config.Scale.Out |> Array.forall ((=) 1.0) then y.alias() else (use s = scaleTensor config.Scale.Out in y.mul s)
    /// Divides layer-major predictions by the output scale (back to the model's units).
    member _.DenormaliseOut(y: torch.Tensor) : torch.Tensor =
        if config.Scale.Out |> Array.forall ((=) 1.0) then y.alias() else (use s = scaleTensor config.Scale.Out in y.div s)

    /// Pre-activations [L, B, d_sae] of normalised layer-major inputs [L, B, d_in].
    member this.PreActivations(xn: torch.Tensor) : torch.Tensor = this.PreActivationsIn(xn, torch.float32)

    /// Pre-activations computed in `dtype` (float32 master weights cast for the product); the result has that dtype.
    member this.PreActivationsIn(xn: torch.Tensor, dtype: torch.ScalarType) : torch.Tensor =
        let inputBias = this.InputBias
        if not xn.requires_grad && torch.is_grad_enabled () then
            // training: the input needs no gradient, so the input bias only needs −W_enc·∂b_enc (no [B, F]·[F, D] product)
            use xc =
                use _ = torch.no_grad ()
                match inputBias with
                | Some b -> (use b1 = b.unsqueeze 1 in xn.sub b1)
                | None -> xn.alias()
            CoderKernels.encodeAffine xc wEnc bEnc inputBias dtype
        else
        use be = bEnc.unsqueeze 1
        let b1 = inputBias |> Option.map (fun b -> b.unsqueeze 1)
        try Encoder.preActivations dtype b1 wEnc be xn
        finally b1 |> Option.iter (fun t -> t.Dispose())

    /// Feature activations from pre-activations; for BatchTopK also the smallest positive kept value per layer.
    member this.Activate(pre: torch.Tensor) : torch.Tensor * torch.Tensor option =
        match config.Activation with
        | ReLU -> pre.relu (), None
        | JumpReLU j ->
            use th = this.Threshold.Value
            use th1 = th.unsqueeze 1
            SparseActivations.jumpReLU pre th1 j.Bandwidth, None
        | TopK k -> SparseActivations.topK k pre, None
        | BatchTopK k ->
            let a, m = SparseActivations.batchTopK k pre
            a, Some m
        | GroupMax k -> SparseActivations.groupMax k pre, None

    /// Σ_{ℓ≤ℓ'} a_ℓ·W_dec^{ℓ→ℓ'} [L, B, d_out], without biases or skip path (as used by ghost grads and AuxK).
    member this.DecodeNoBias(acts: torch.Tensor) : torch.Tensor =
        this.DecodeLayers(acts.shape[1], fun l w ->
            use al = acts[l]
            if al.dtype = w.dtype then al.matmul w
            else
                use wd = w.to_type al.dtype
                use y = al.matmul wd
                y.to_type torch.float32)

    /// `DecodeNoBias` of sparse activations (values, indices [L, B, k]): only the k decoder rows of each token are read
    /// (`CoderKernels.decode`). Values are taken in float32; the result is float32.
    member this.DecodeSparseNoBias(values: torch.Tensor, indices: torch.Tensor) : torch.Tensor =
        this.DecodeLayers(values.shape[1], fun l w ->
            use vl = values[l]
            use v32 = vl.to_type torch.float32
            use il = indices[l]
            CoderKernels.decode v32 il w)

    /// Sums per-layer decoder products: `product l W` gives layer l's activations times W_dec_l viewed as
    /// [d_sae, (L−l)·d_out], as [B, (L−l)·d_out].
    member private _.DecodeLayers(b: int64, product: int -> torch.Tensor -> torch.Tensor) : torch.Tensor =
        let dOut, dSae = int64 config.DOut, int64 config.DSae
        if nL = 1 then
            use w = wDec[0].reshape(dSae, dOut)
            use y = product 0 w
            y.unsqueeze 0
        else
            let mutable acc : torch.Tensor = null
            for l in 0 .. nL - 1 do
                let span = int64 (nL - l)
                use w = wDec[l].reshape(dSae, span * dOut)
                use c = product l w
                use c3 = c.reshape(b, span, dOut)
                let padded = if l = 0 then c3.alias() else torch.nn.functional.pad(c3, [| 0L; 0L; int64 l; 0L |])
                if isNull acc then acc <- padded
                else
                    let s = acc.add padded
                    acc.Dispose()
                    padded.Dispose()
                    acc <- s
            use bld = acc
            bld.transpose(0, 1).contiguous()

    /// Full decode [L, B, d_out] in normalised units: decoders, skip path (needs the normalised input) and b_dec.
    member this.DecodeNormalised(acts: torch.Tensor, xn: torch.Tensor option) : torch.Tensor =
        use y = this.DecodeNoBias acts
        this.AddSkipAndBias(y, xn)

    /// y + W_skip·x (skip transcoders) + b_dec.
    member private _.AddSkipAndBias(y: torch.Tensor, xn: torch.Tensor option) : torch.Tensor =
        use bd = bDec.unsqueeze 1
        match wSkip with
        | Some ws ->
            let xn = match xn with Some x -> x | None -> invalidArg "x" "a skip transcoder needs its input to decode (skip path W_skip·x)"
            use wt = ws.transpose(1, 2)
            use skip = torch.bmm(xn, wt)
            use ys = y.add skip
            ys.add bd
        | None -> y.add bd

    /// Encode, activate and decode normalised layer-major inputs [L, B, d_in].
    member this.PassNormalised(xn: torch.Tensor) : CoderPass = this.PassWith(xn, ComputeOptions.Default)

    /// `PassNormalised` computed as `options` say (dtype of the products, sparse decoding for TopK/GroupMax).
    /// With sparse decoding, `preGradient = false` (the caller's loss does not differentiate `Pre`) and an input that
    /// needs no gradient, the encoder's backward is sparse too (`CoderKernels.encodeSelected`) and `Pre` is returned
    /// without gradient.
    member this.PassWith(xn: torch.Tensor, options: ComputeOptions, ?preGradient: bool) : CoderPass =
        let select =
            if not options.SparseDecode then None
            else
                match config.Activation with
                | TopK k -> Some(SparseActivations.topKSparse k)
                | GroupMax k -> Some(SparseActivations.groupMaxSparse k)
                | _ -> None
        match select with
        | Some select when not (defaultArg preGradient true) && not xn.requires_grad ->
            let pre, indices =
                use _ = torch.no_grad ()
                let pre = this.PreActivationsIn(xn, options.Dtype)
                let v, i = select pre
                v.Dispose()
                pre, i
            let inputBias = if config.InputBias then (if config.Kind = Sae then Some(bDec :> torch.Tensor) else bIn |> Option.map (fun p -> p :> torch.Tensor)) else None
            let perLayer =
                [| for l in 0 .. nL - 1 ->
                    use xl = xn[l]
                    use bl = inputBias |> Option.map (fun b -> b[l]) |> Option.toObj
                    use xc = (use _ = torch.no_grad () in if isNull bl then xl.alias() else xl.sub bl)
                    use pl = pre[l]
                    use il = indices[l]
                    use wl = wEnc[l]
                    use bel = bEnc[l]
                    CoderKernels.encodeSelected pl il xc wl bel (Option.ofObj bl) |]
            let raw = if nL = 1 then perLayer[0].unsqueeze 0 else torch.stack(perLayer, 0)
            for t in perLayer do t.Dispose()
            use raw = raw
            let values = raw.relu ()
            let acts = SparseActivations.scatterActive pre (values, indices)
            use y = this.DecodeSparseNoBias(values, indices)
            let pred = this.AddSkipAndBias(y, Some xn)
            { Pre = pre; Acts = acts; Prediction = pred; BatchMinKept = None; Active = Some { Indices = indices; Values = values } }
        | Some select ->
            let pre = this.PreActivationsIn(xn, options.Dtype)
            let values, indices = select pre
            let acts = SparseActivations.scatterActive pre (values, indices)
            use y = this.DecodeSparseNoBias(values, indices)
            let pred = this.AddSkipAndBias(y, Some xn)
            { Pre = pre; Acts = acts; Prediction = pred; BatchMinKept = None; Active = Some { Indices = indices; Values = values } }
        | None ->
            let pre = this.PreActivationsIn(xn, options.Dtype)
            let acts, minKept = this.Activate pre
            let pred = this.DecodeNormalised(acts, Some xn)
            { Pre = pre; Acts = acts; Prediction = pred; BatchMinKept = minKept; Active = None }

    /// Feature activations of user-layout inputs in the model's units: [..., d_sae] (or [..., L, d_sae]).
    member this.Encode(x: torch.Tensor) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let lead = this.LeadingShape x
        let xn = this.NormaliseIn(this.ToLayerMajor(x, config.DIn, "x"))
        let a, _ = this.Activate(this.PreActivations xn)
        this.FromLayerMajor(a, lead).MoveToOuterDisposeScope()

    /// Predictions in the model's units from feature activations (user layout); `x` is needed by skip transcoders.
    member this.Decode(acts: torch.Tensor, ?x: torch.Tensor) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let lead = this.LeadingShape acts
        let a = this.ToLayerMajor(acts, config.DSae, "acts")
        let xn = x |> Option.map (fun x -> this.NormaliseIn(this.ToLayerMajor(x, config.DIn, "x")))
        let y = this.DenormaliseOut(this.DecodeNormalised(a, xn))
        this.FromLayerMajor(y, lead).MoveToOuterDisposeScope()

    /// Prediction of user-layout inputs, in the model's units: [..., d_out] (or [..., L, d_out]).
    member this.Forward(x: torch.Tensor) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let lead = this.LeadingShape x
        let xn = this.NormaliseIn(this.ToLayerMajor(x, config.DIn, "x"))
        let p = this.PassNormalised xn
        this.FromLayerMajor(this.DenormaliseOut p.Prediction, lead).MoveToOuterDisposeScope()

    /// Prediction and feature activations of user-layout inputs, in the model's units.
    member this.ForwardWithActivations(x: torch.Tensor) : torch.Tensor * torch.Tensor =
        use scope = torch.NewDisposeScope()
        let lead = this.LeadingShape x
        let xn = this.NormaliseIn(this.ToLayerMajor(x, config.DIn, "x"))
        let p = this.PassNormalised xn
        let y = this.FromLayerMajor(this.DenormaliseOut p.Prediction, lead).MoveToOuterDisposeScope()
        let a = this.FromLayerMajor(p.Acts, lead).MoveToOuterDisposeScope()
        y, a

    /// Detached copies of every parameter and buffer (layer-major names, see `ParameterShapes`).
    member _.StateDict() : (string * torch.Tensor) list =
        use _ = torch.no_grad ()
        [ for n, p in named -> n, p.detach().clone()
          match batchTopKThreshold with Some t -> yield "batchtopk_threshold", t.clone() | None -> () ]

    /// Copies values into the parameters and buffers (shapes must match `ParameterShapes`).
    member _.LoadStateDict(values: (string * torch.Tensor) seq) =
        use _ = torch.no_grad ()
        let expected = Coder.ParameterShapes config |> dict
        let given = values |> Seq.map (fun (n, t) -> n, t) |> dict
        for KeyValue(n, shape) in expected do
            match given.TryGetValue n with
            | true, t ->
                if t.shape <> shape then invalidArg "values" (sprintf "state '%s': shape %A expected, got %A" n shape t.shape)
            | _ -> invalidArg "values" (sprintf "state '%s' is missing" n)
        for KeyValue(n, _) in given do
            if not (expected.ContainsKey n) then invalidArg "values" (sprintf "unexpected state '%s' for this %s" n (CoderConfig.kindName config.Kind))
        for n, p in named do p.copy_(given[n]) |> ignore
        match batchTopKThreshold with Some t -> t.copy_(given["batchtopk_threshold"]) |> ignore | None -> ()

    interface IDisposable with
        member _.Dispose() =
            for _, p in named do p.Dispose()
            batchTopKThreshold |> Option.iter (fun t -> t.Dispose())

/// Creating coders and transforming them (scale folding, input-bias folding, BatchTopK → JumpReLU).
module Coder =

    /// A coder from layer-major tensors (names and shapes as in `Coder.ParameterShapes`); the tensors are copied
    /// to `device` as float32. Missing, unexpected or mis-shaped tensors raise an error naming them.
    let ofTensors (config: CoderConfig) (device: torch.Device) (tensors: (string * torch.Tensor) seq) : Coder =
        let config = CoderConfig.validate config
        let expected = Coder.ParameterShapes config
        let given = Dictionary<string, torch.Tensor>()
        for n, t in tensors do
            if given.ContainsKey n then invalidArg "tensors" (sprintf "tensor '%s' given twice" n)
            given[n] <- t
        let optional = set [ "batchtopk_threshold" ]
        for n in given.Keys do
            if not (expected |> List.exists (fun (e, _) -> e = n)) then
                invalidArg "tensors" (sprintf "unexpected tensor '%s' for a %s with %A activation (expected %s)" n (CoderConfig.kindName config.Kind) config.Activation (String.Join(", ", expected |> List.map fst)))
        let own = Dictionary<string, torch.Tensor>()
        // the copies become parameters (which leave this scope); every temporary is freed with it
        use scope = torch.NewDisposeScope()
        use _ = torch.no_grad ()
        for n, shape in expected do
            match given.TryGetValue n with
            | true, t ->
                if t.shape <> shape then invalidArg "tensors" (sprintf "tensor '%s' has shape %A; this config needs %A" n t.shape shape)
                own[n] <- t.detach().``to``(torch.float32, device).clone()
            | _ when optional.Contains n -> ()
            | _ -> invalidArg "tensors" (sprintf "tensor '%s' is missing (shape %A expected)" n shape)
        new Coder(config, own, device)

    /// A freshly initialised coder (`Device.seed` first for reproducible runs: draws come from the seeded flow's
    /// generator, `Rng`).
    /// Decoder vectors: random directions of unit norm (over the concatenation of a feature's decoders);
    /// encoder: the decoder's transpose for an SAE (tied init), else Kaiming-uniform U(±√(6/d_sae)) as in the
    /// transcoder paper; biases and W_skip zero; JumpReLU log θ = log θ₀.
    let create (config: CoderConfig) (device: torch.Device) : Coder =
        let config = CoderConfig.validate config
        let nL, dIn, dOut, dSae = int64 config.NLayers, int64 config.DIn, int64 config.DOut, int64 config.DSae
        use scope = torch.NewDisposeScope()
        use _ = torch.no_grad ()
        let t = Dictionary<string, torch.Tensor>()
        let decs =
            [| for l in 0L .. nL - 1L -> torch.randn([| dSae; nL - l; dOut |], dtype = torch.float32, device = device, generator = Transcoders.Tensors.Rng.generator device) |]
        for l in 0 .. int nL - 1 do
            let w = decs[l]
            use n = w.pow(sc 2.0).sum([| 1L; 2L |], keepdim = true).sqrt()
            w.div_ n |> ignore
            t[sprintf "W_dec_%d" l] <- w
        t["W_enc"] <-
            if config.Kind = Sae then
                use d0 = decs[0].reshape(dSae, dOut)
                d0.t().unsqueeze(0).contiguous()
            else
                let bound = sqrt (6.0 / float dSae)
                torch.empty([| nL; dIn; dSae |], dtype = torch.float32, device = device).uniform_(-bound, bound, Transcoders.Tensors.Rng.generator device)
        t["b_enc"] <- torch.zeros([| nL; dSae |], dtype = torch.float32, device = device)
        t["b_dec"] <- torch.zeros([| nL; dOut |], dtype = torch.float32, device = device)
        match config.Activation with
        | JumpReLU j -> t["log_threshold"] <- torch.full([| nL; dSae |], sc (log j.InitialThreshold), dtype = torch.float32, device = device)
        | _ -> ()
        if config.InputBias && config.Kind <> Sae then t["b_in"] <- torch.zeros([| nL; dIn |], dtype = torch.float32, device = device)
        if config.Kind = SkipTranscoder then t["W_skip"] <- torch.zeros([| nL; dOut; dIn |], dtype = torch.float32, device = device)
        new Coder(config, t, device)

    /// An independent copy (same config, copied parameters) on the same device.
    let clone (c: Coder) : Coder =
        let sd = c.StateDict()
        try ofTensors c.Config c.Device sd
        finally for _, t in sd do t.Dispose()

    /// Transcoders only: folds the input bias into the encoder bias (b_enc ← b_enc − b_in·W_enc, exact),
    /// returning a coder without `b_in`. SAEs and coders without an input bias are copied unchanged.
    let foldInputBias (c: Coder) : Coder =
        match c.BIn with
        | None -> clone c
        | Some bIn ->
            use scope = torch.NewDisposeScope()
            use _ = torch.no_grad ()
            let sd = c.StateDict() |> List.filter (fun (n, _) -> n <> "b_in" && n <> "b_enc")
            // (b_in [L, 1, d_in] @ W_enc [L, d_in, d_sae]) → [L, d_sae]
            let shift = torch.bmm(bIn.unsqueeze 1, c.WEnc).squeeze 1
            let bEnc = c.BEnc.sub shift
            ofTensors { c.Config with InputBias = false } c.Device (("b_enc", bEnc) :: sd)

    /// Folds the activation scales into the weights so that the coder works in the model's units with scale 1,
    /// computing exactly the same predictions and feature activations (pre-activations are unchanged, so JumpReLU
    /// and BatchTopK thresholds carry over). Records the folded scales in `FoldedScale`.
    let foldScale (c: Coder) : Coder =
        let cfg = c.Config
        if cfg.Scale.IsOne then clone c
        else
            use scope = torch.NewDisposeScope()
            use _ = torch.no_grad ()
            let nL = cfg.NLayers
            let dev = c.Device
            let vec (v: float[]) = torch.tensor(v |> Array.map float32, device = dev)
            let sIn, sOut = vec cfg.Scale.In, vec cfg.Scale.Out
            let sd = c.StateDict() |> dict
            let out = Dictionary<string, torch.Tensor>()
            for KeyValue(n, t) in sd do out[n] <- t
            // pre = (s·x − b)·W + b_enc = (x − b/s)·(s·W) + b_enc. An SAE's input bias is b_dec, also its output
            // bias; its scales are equal (validated), so the b_dec/s_out below serves both roles.
            out["W_enc"] <- sd["W_enc"].mul(sIn.reshape(int64 nL, 1L, 1L))
            match c.BIn with
            | Some _ -> out["b_in"] <- sd["b_in"].div(sIn.reshape(int64 nL, 1L))
            | None -> ()
            for l in 0 .. nL - 1 do
                // W_dec_l[:, j, :] writes to layer l + j
                let s = sOut.narrow(0, int64 l, int64 (nL - l)).reshape(1L, int64 (nL - l), 1L)
                out[sprintf "W_dec_%d" l] <- sd[sprintf "W_dec_%d" l].div s
            out["b_dec"] <- sd["b_dec"].div(sOut.reshape(int64 nL, 1L))
            if cfg.Kind = SkipTranscoder then
                out["W_skip"] <- sd["W_skip"].mul(sIn.div(sOut).reshape(int64 nL, 1L, 1L))
            let cfg' = { cfg with Scale = ActivationScale.Ones nL; FoldedScale = Some cfg.Scale }
            ofTensors cfg' dev (out |> Seq.map (fun (KeyValue(n, t)) -> n, t))

    /// A JumpReLU coder with the same weights and the given per-layer thresholds (e.g. a BatchTopK coder's calibrated
    /// threshold, `BatchTopKThreshold`): a = z·H(z − θ_ℓ) for every feature of layer ℓ.
    let toJumpReLU (c: Coder) (thresholds: float[]) (bandwidth: float) : Coder =
        let cfg = c.Config
        if thresholds.Length <> cfg.NLayers then
            invalidArg "thresholds" (sprintf "one threshold per layer expected (%d), got %d" cfg.NLayers thresholds.Length)
        if thresholds |> Array.exists (fun t -> not (t > 0.0 && Double.IsFinite t)) then
            invalidArg "thresholds" (sprintf "thresholds must be positive and finite (got %A): calibrate the BatchTopK threshold on data first" thresholds)
        use scope = torch.NewDisposeScope()
        use _ = torch.no_grad ()
        let sd = c.StateDict() |> List.filter (fun (n, _) -> n <> "batchtopk_threshold" && n <> "log_threshold")
        let logTh =
            torch.tensor(thresholds |> Array.map (fun t -> float32 (log t)), device = c.Device)
                .reshape(int64 cfg.NLayers, 1L).expand(int64 cfg.NLayers, int64 cfg.DSae).contiguous()
        let cfg' = { cfg with Activation = JumpReLU { InitialThreshold = Array.average thresholds; Bandwidth = bandwidth } }
        ofTensors cfg' c.Device (("log_threshold", logTh) :: sd)
