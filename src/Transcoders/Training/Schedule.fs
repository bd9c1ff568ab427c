/// Learning-rate schedules as data, and the pure function giving the rate at each step.
module Transcoders.Training.Schedule

open System
open System.Text.Json.Nodes

/// A learning-rate schedule. Steps are 0-based optimizer updates: `lrAt s i` is the rate used by the
/// i-th update. Warmup rises linearly, lr·(i+1)/warmup, so the first update already moves and update
/// `warmup-1` uses the peak. Decays run from the peak at step `warmup` (or the decay's start) to
/// `lr·minRatio` at step `total`, and stay there after it.
type Schedule =
    /// The same rate at every step.
    | Constant of lr: float
    /// Linear warmup, then half a cosine down to lr·minRatio at `total` (GPT-2/3, nanoGPT, Chinchilla).
    | WarmupCosine of lr: float * warmup: int * total: int * minRatio: float
    /// Linear warmup, then a straight line down to lr·minRatio at `total` (BERT, HF's default).
    | WarmupLinearDecay of lr: float * warmup: int * total: int * minRatio: float
    /// Warmup-stable-decay (MiniCPM; Hägele et al. 2024; SAELens's warmup + final decay): linear warmup,
    /// the peak until `total - decay`, then a straight line down to lr·minRatio over the last `decay` steps.
    /// `decay = 0` is warmup followed by a constant rate.
    | WarmupStableDecay of lr: float * warmup: int * total: int * decay: int * minRatio: float
    /// The sparse-coder schedule (the transcoder paper: warmup, then constant; Anthropic: a linear decay over the
    /// last ~20%): a warmup factor min(1, (i+1)/warmup) times a decay factor that is 1 until step
    /// total·(1 − decayFraction) and then falls linearly to minRatio at `total`. Unlike the schedules above the
    /// decay's length is a fraction of the run and the warmup may run past the decay's start or past `total`
    /// (the two factors multiply). `decayFraction = 0` is warmup followed by a constant rate.
    | WarmupFractionDecay of lr: float * warmup: int * total: int * decayFraction: float * minRatio: float

/// The peak (nominal) learning rate of a schedule.
let peak (schedule: Schedule) =
    match schedule with
    | Constant lr
    | WarmupCosine (lr, _, _, _)
    | WarmupLinearDecay (lr, _, _, _)
    | WarmupStableDecay (lr, _, _, _, _)
    | WarmupFractionDecay (lr, _, _, _, _) -> lr

/// Problems with a schedule's values, as readable messages (empty when valid).
let problems (schedule: Schedule) : string list =
    let lrOk lr = [ if not (Double.IsFinite lr) || lr < 0.0 then sprintf "lr must be finite and >= 0, got %g" lr ]
    let ratioOk r = [ if not (Double.IsFinite r) || r < 0.0 || r > 1.0 then sprintf "minRatio must be in [0, 1], got %g" r ]
    let warmTotal w t =
        [ if w < 0 then sprintf "warmup must be >= 0, got %d" w
          if t <= 0 then sprintf "total must be > 0, got %d" t
          if w > t then sprintf "warmup (%d) must not exceed total (%d)" w t ]
    match schedule with
    | Constant lr -> lrOk lr
    | WarmupCosine (lr, w, t, r)
    | WarmupLinearDecay (lr, w, t, r) -> lrOk lr @ warmTotal w t @ ratioOk r
    | WarmupStableDecay (lr, w, t, d, r) ->
        lrOk lr @ warmTotal w t @ ratioOk r
        @ [ if d < 0 then sprintf "decay must be >= 0, got %d" d
            if w + d > t then sprintf "warmup (%d) + decay (%d) must not exceed total (%d)" w d t ]
    | WarmupFractionDecay (lr, w, t, f, r) ->
        lrOk lr @ ratioOk r
        @ [ if w < 0 then sprintf "warmup must be >= 0, got %d" w
            if t < 0 then sprintf "total must be >= 0, got %d" t
            if not (f >= 0.0 && f <= 1.0) then sprintf "decayFraction must be in [0, 1], got %g" f ]

/// Raises ArgumentException listing every problem when the schedule is invalid.
let validate (schedule: Schedule) =
    match problems schedule with
    | [] -> ()
    | ps -> invalidArg "schedule" (sprintf "invalid schedule %A: %s" schedule (String.concat "; " ps))

let private warmupFactor (warmup: int) (step: int) =
    if step < warmup then float (step + 1) / float warmup else 1.0

/// Fraction of the way through [start, total], clamped to [0, 1].
let private progress (start: int) (total: int) (step: int) =
    if total <= start then 1.0 else Math.Clamp(float (step - start) / float (total - start), 0.0, 1.0)

/// The learning rate of the `step`-th update (0-based). Pure; defined for every step >= 0.
let lrAt (schedule: Schedule) (step: int) : float =
    if step < 0 then invalidArg "step" (sprintf "step must be >= 0, got %d" step)
    match schedule with
    | Constant lr -> lr
    | WarmupCosine (lr, w, t, r) ->
        if step < w then lr * warmupFactor w step
        else
            let p = progress w t step
            lr * (r + (1.0 - r) * 0.5 * (1.0 + Math.Cos(Math.PI * p)))
    | WarmupLinearDecay (lr, w, t, r) ->
        if step < w then lr * warmupFactor w step
        else lr * (r + (1.0 - r) * (1.0 - progress w t step))
    | WarmupStableDecay (lr, w, t, d, r) ->
        let decayStart = t - d
        if step < w then lr * warmupFactor w step
        elif d = 0 || step < decayStart then lr
        else lr * (r + (1.0 - r) * (1.0 - progress decayStart t step))
    | WarmupFractionDecay (lr, w, t, f, r) ->
        let warm = if w > 0 then min 1.0 (float (step + 1) / float w) else 1.0
        let decay =
            if f <= 0.0 then 1.0
            else
                let start = float t * (1.0 - f)
                if float step < start then 1.0
                else 1.0 - (1.0 - r) * min 1.0 ((float step - start) / max 1.0 (float t - start))
        lr * (warm * decay)

/// The schedule as a JSON object: `{"kind": "warmup_cosine", "lr": ..., "warmup": ..., ...}`.
let toJson (schedule: Schedule) : JsonObject =
    let o = JsonObject()
    let set (k: string) (v: JsonNode) = o[k] <- v
    match schedule with
    | Constant lr ->
        set "kind" (JsonValue.Create "constant"); set "lr" (JsonValue.Create lr)
    | WarmupCosine (lr, w, t, r) ->
        set "kind" (JsonValue.Create "warmup_cosine"); set "lr" (JsonValue.Create lr)
        set "warmup" (JsonValue.Create w); set "total" (JsonValue.Create t); set "min_ratio" (JsonValue.Create r)
    | WarmupLinearDecay (lr, w, t, r) ->
        set "kind" (JsonValue.Create "warmup_linear_decay"); set "lr" (JsonValue.Create lr)
        set "warmup" (JsonValue.Create w); set "total" (JsonValue.Create t); set "min_ratio" (JsonValue.Create r)
    | WarmupStableDecay (lr, w, t, d, r) ->
        set "kind" (JsonValue.Create "warmup_stable_decay"); set "lr" (JsonValue.Create lr)
        set "warmup" (JsonValue.Create w); set "total" (JsonValue.Create t); set "decay" (JsonValue.Create d)
        set "min_ratio" (JsonValue.Create r)
    | WarmupFractionDecay (lr, w, t, f, r) ->
        set "kind" (JsonValue.Create "warmup_fraction_decay"); set "lr" (JsonValue.Create lr)
        set "warmup" (JsonValue.Create w); set "total" (JsonValue.Create t); set "decay_fraction" (JsonValue.Create f)
        set "min_ratio" (JsonValue.Create r)
    o

/// Reads a schedule written by `toJson`, failing with the missing or unknown field named.
let ofJson (node: JsonNode) : Schedule =
    let o =
        match node with
        | :? JsonObject as o -> o
        | _ -> failwithf "schedule: expected a JSON object, got %s" (if isNull node then "null" else node.ToJsonString())
    let field (k: string) =
        match o[k] with
        | null -> failwithf "schedule: missing field '%s' in %s" k (o.ToJsonString())
        | v -> v
    let f k = (field k).GetValue<float>()
    let i k = (field k).GetValue<int>()
    let schedule =
        match (field "kind").GetValue<string>() with
        | "constant" -> Constant(f "lr")
        | "warmup_cosine" -> WarmupCosine(f "lr", i "warmup", i "total", f "min_ratio")
        | "warmup_linear_decay" -> WarmupLinearDecay(f "lr", i "warmup", i "total", f "min_ratio")
        | "warmup_stable_decay" -> WarmupStableDecay(f "lr", i "warmup", i "total", i "decay", f "min_ratio")
        | "warmup_fraction_decay" -> WarmupFractionDecay(f "lr", i "warmup", i "total", f "decay_fraction", f "min_ratio")
        | k -> failwithf "schedule: unknown kind '%s' (expected constant, warmup_cosine, warmup_linear_decay, warmup_stable_decay or warmup_fraction_decay)" k
    validate schedule
    schedule
