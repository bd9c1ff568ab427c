#!/usr/bin/python3
"""The PyTorch side of the attribution-graph benchmark (bench/Transcoders.Bench `graph`).

circuit-tracer's batched-backward attribution (Ameisen et al. 2025; decoderesearch/circuit-tracer,
attribute_transformerlens.py + context_transformerlens.py + graph.py), written again for OUR files so that
both sides read the very same model and transcoders:

- the model: our checkpoint folder (config.json with "format": "transcoders.transformer" + model.safetensors,
  parameter names as in src/Transcoders/Models/Layers.fs), any of the architectures the format describes
  (LayerNorm/RMSNorm/none, learned or rotary positions, plain or gated MLP, grouped-query attention, tied or
  untied unembedding);
- the coders: our coder files (coder.json + coder.safetensors with SAELens-style keys, docs/formats.md):
  transcoders, skip transcoders or one cross-layer transcoder, with ReLU, JumpReLU or TopK activations.

The local replacement model of a prompt: the real forward pass gives every layer's MLP input (ln2's output),
MLP output, normalisation scales and attention patterns; the coders give the active features (nonzero
activations) and an error vector per (layer, position) = MLP output − coder output. The replacement forward
freezes the normalisation scales and the attention patterns, replaces each MLP output by a constant
(features' decoded output + b_dec + error; a skip transcoder's W_skip·x stays live), so the residual stream
is linear in the token embeddings, the decoded features and the errors. Nodes: active features (ordered by
layer, position, feature), error nodes (layer-major), token embeddings (hook_embed), logits (the top logits
up to 95% probability, at most 10; de-meaned unembedding rows). Edge A[target, source] is found by injecting
the target's encoder vector (or de-meaned unembedding row) as the gradient at its MLP input (or at the final
normalised residual, last position) and contracting the gradients reaching each MLP output with the active
features' activation-scaled decoder vectors, each error vector and each token embedding. One backward pass
per batch of `batch_size` targets, on a forward pass over `batch_size` copies of the prompt (the frozen
attention patterns are computed once and broadcast over the copies). Features are visited in influence order
when `max_feature_nodes` caps them (partial influences recomputed every `update_interval` batches). The dense
adjacency is then optionally pruned by influence (0.8 of node influence, 0.98 of edge influence).

No pickles and no `safetensors` package: safetensors files are read with a small reader (JSON header +
numpy.frombuffer). Needs Debian's python3-torch and libopenblas0 on the CPU machine.

Standalone:  /usr/bin/python3 bench/pytorch/graph_build.py --model DIR --coders C0 C1 ... --tokens 1,2,3 --reps 3
Server mode (the F# benchmark interleaves rounds): --server, then JSON lines on stdin:
  {"cmd": "build", "tokens": [...], "reps": N, "save": PATH|null, "max_feature_nodes": M (optional; 0: all)}
      -> {"seconds": [...], "phases": {...}, "features": F, "active_features": F0, "nodes": N, "edges": E,
          "logits": K, "pruned_nodes": n, "pruned_edges": e}
     `save` writes the adjacency and its node table as safetensors (F32 `adjacency` [N, N] rows = targets,
     I64 `features` [F, 3] (layer, position, feature), I64 `logit_tokens` [K], F32 `logit_probabilities` [K],
     F32 `activations` [F]; with --prune also I64 `pruned_nodes` [n] (kept node ids) and `pruned_edges` [e, 2] (target,
     source)).
  {"cmd": "matmul", "n": 1024, "reps": R} -> {"gflops": [...]}
  {"cmd": "memory"} -> {"rss_mib": ..., "peak_rss_mib": (VmHWM, since the last reset_peak), "max_rss_mib": (whole run),
                       "cuda_peak_mib": ...}
  {"cmd": "reset_peak"} -> {"rss_mib": ...}  (VmHWM back to the current resident size)
  {"cmd": "quit"}
"""
import argparse
import json
import math
import os
import resource
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------------
# safetensors, by hand


_DTYPES = {
    "F64": (np.float64, torch.float64), "F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
    "I64": (np.int64, torch.int64), "I32": (np.int32, torch.int32), "I16": (np.int16, torch.int16),
    "I8": (np.int8, torch.int8), "U8": (np.uint8, torch.uint8), "BOOL": (np.bool_, torch.bool),
}


class FormatError(Exception):
    pass


def read_safetensors(path):
    """(tensors by name, metadata) of a safetensors file; every header field and size is checked."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise FormatError(f"{path}: too short for a safetensors file ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise FormatError(f"{path}: header length {n} exceeds the file ({len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: header is not valid JSON ({e})")
    base = 8 + n
    meta = header.pop("__metadata__", {}) or {}
    out = {}
    for name, e in header.items():
        dtype, shape, (start, end) = e["dtype"], e["shape"], e["data_offsets"]
        count = int(np.prod(shape)) if shape else 1
        if base + end > len(data) or start > end:
            raise FormatError(f"{path}: tensor '{name}' data_offsets {start}..{end} fall outside the file")
        raw = data[base + start:base + end]
        if dtype == "BF16":
            if len(raw) != 2 * count:
                raise FormatError(f"{path}: tensor '{name}' BF16 {shape} needs {2 * count} bytes, has {len(raw)}")
            u = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            arr = u.view(np.float32)
        elif dtype in _DTYPES:
            npd = _DTYPES[dtype][0]
            if len(raw) != np.dtype(npd).itemsize * count:
                raise FormatError(f"{path}: tensor '{name}' {dtype} {shape} has {len(raw)} bytes")
            arr = np.frombuffer(raw, dtype=npd)
        else:
            raise FormatError(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
        out[name] = torch.from_numpy(arr.copy().reshape(shape))
    return out, meta


def write_safetensors(path, tensors, metadata=None):
    """Writes name -> tensor (float32/int64) atomically (temporary file, then rename)."""
    header, blobs, offset = {}, [], 0
    names = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.int32: "I32"}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        b = t.numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# our model format


class Model:
    """A decoder-only transformer from our checkpoint folder (weights as plain tensors on `device`)."""

    def __init__(self, folder, device):
        cfg_path = os.path.join(folder, "config.json")
        with open(cfg_path) as f:
            doc = json.load(f)
        if doc.get("format") != "transcoders.transformer":
            raise FormatError(f"{cfg_path}: not a Transcoders transformer checkpoint (format {doc.get('format')!r})")
        c = doc["config"]
        self.c = c
        self.d, self.n_layers, self.n_heads = c["d_model"], c["n_layers"], c["n_heads"]
        self.n_kv = c["n_kv_heads"]
        self.d_head = c["d_head"] if c.get("d_head") is not None else self.d // self.n_heads
        self.n_ctx, self.vocab = c["n_ctx"], c["vocab_size"]
        self.norm, self.eps, self.final_norm = c["normalization"], c["norm_eps"], c["final_norm"]
        self.positions = c["positions"]
        self.mlp_kind, self.act = c["mlp"]["kind"], c["mlp"]["activation"]
        self.tied = c["tied_unembed"]
        w, _ = read_safetensors(os.path.join(folder, "model.safetensors"))
        self.w = {k: v.to(device=device, dtype=torch.float32) for k, v in w.items()}
        self.device = device
        need = ["embed.weight"] + (["pos_embed.weight"] if self.positions["kind"] == "learned" else [])
        for k in need:
            if k not in self.w:
                raise FormatError(f"{folder}/model.safetensors: tensor '{k}' is missing")
        self.W_E = self.w["embed.weight"]
        self.W_U = self.W_E if self.tied else self.w["unembed.weight"]  # [vocab, d]
        self.b_U = self.w.get("unembed.bias")
        if self.positions["kind"] == "rotary":
            e = self.d_head
            inv = self.positions["theta"] ** (-torch.arange(0, e, 2, dtype=torch.float64) / e)
            ang = torch.arange(self.n_ctx, dtype=torch.float64)[:, None] * inv[None, :]
            self.rot_cos, self.rot_sin = ang.cos().float().to(device), ang.sin().float().to(device)

    def p(self, name):
        return self.w.get(name)

    def lin(self, x, prefix):
        return F.linear(x, self.w[prefix + ".weight"], self.w.get(prefix + ".bias"))

    def activation(self, x):
        a = self.act
        if a == "gelu_new":
            return F.gelu(x, approximate="tanh")
        if a == "gelu":
            return F.gelu(x)
        if a == "relu":
            return F.relu(x)
        if a == "silu":
            return F.silu(x)
        raise FormatError(f"unknown activation {a}")

    def scale(self, x):
        """The normalisation's per-token divisor [.., 1] (None without normalisation)."""
        if self.norm == "layernorm":
            c = x - x.mean(-1, keepdim=True)
            return (c.square().mean(-1, keepdim=True) + self.eps).sqrt()
        if self.norm == "rmsnorm":
            return (x.square().mean(-1, keepdim=True) + self.eps).sqrt()
        return None

    def normed(self, x, prefix, scale):
        """The normalisation with a given (possibly frozen) scale: linear in x when the scale is a constant."""
        if self.norm == "layernorm":
            return (x - x.mean(-1, keepdim=True)) / scale * self.w[prefix + ".weight"] + self.w[prefix + ".bias"]
        if self.norm == "rmsnorm":
            return x / scale * self.w[prefix + ".weight"]
        return x

    def rotate(self, t):
        """Rotary embedding of [b, p, heads, e] from position 0."""
        kind = self.positions["layout"]
        p = t.shape[1]
        cos, sin = self.rot_cos[:p][None, :, None, :], self.rot_sin[:p][None, :, None, :]
        if kind == "half_split":
            h = t.shape[-1] // 2
            x1, x2 = t[..., :h], t[..., h:]
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        x1, x2 = t[..., 0::2], t[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)

    def heads(self, t, n):
        b, p, _ = t.shape
        return t.view(b, p, n, self.d_head)

    def values(self, h, l):
        """Values [b, heads, p, e] (kv heads repeated for grouped-query attention)."""
        v = self.heads(self.lin(h, f"blocks.{l}.attn.v"), self.n_kv).transpose(1, 2)
        return v if self.n_kv == self.n_heads else v.repeat_interleave(self.n_heads // self.n_kv, dim=1)

    def pattern(self, h, l):
        q = self.heads(self.lin(h, f"blocks.{l}.attn.q"), self.n_heads)
        k = self.heads(self.lin(h, f"blocks.{l}.attn.k"), self.n_kv)
        if self.positions["kind"] == "rotary":
            q, k = self.rotate(q), self.rotate(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if self.n_kv != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        p = q.shape[2]
        s = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)
        mask = torch.ones(p, p, dtype=torch.bool, device=h.device).tril()
        return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)

    def attn_out(self, pattern, v, l):
        z = (pattern @ v).transpose(1, 2)
        b, p = z.shape[0], z.shape[1]
        return self.lin(z.reshape(b, p, self.n_heads * self.d_head), f"blocks.{l}.attn.o")

    def mlp(self, x, l):
        pre = f"blocks.{l}.mlp"
        if self.mlp_kind == "gated":
            return self.lin(self.activation(self.lin(x, pre + ".fc_gate")) * self.lin(x, pre + ".fc_in"), pre + ".fc_out")
        return self.lin(self.activation(self.lin(x, pre + ".fc_in")), pre + ".fc_out")

    def embed_tokens(self, tokens):
        return self.W_E[tokens]

    def pos(self, p):
        return self.w["pos_embed.weight"][:p] if self.positions["kind"] == "learned" else None

    def unembed(self, x):
        return F.linear(x, self.W_U, self.b_U)


# ---------------------------------------------------------------------------------------------------------
# our coder format


class LayerCoder:
    """What attribution needs of the coder(s) at one model layer, in the model's units: the encoder
    (pre-activations = x·W_enc + b_enc), the decoders to this and later layers, b_dec and a skip path."""

    def __init__(self, layer, w_enc, b_enc, threshold, decoders, b_dec, w_skip, activation):
        self.layer = layer
        self.w_enc, self.b_enc, self.threshold = w_enc, b_enc, threshold  # [d_in, F], [F], [F] or None
        self.decoders = decoders  # model layer -> [F, d_out]
        self.b_dec, self.w_skip = b_dec, w_skip  # [d_out] of this layer, [d_out, d_in] or None
        self.activation = activation

    def activations(self, x):
        """Feature activations [p, F] of MLP inputs [p, d_in]."""
        pre = x @ self.w_enc + self.b_enc
        kind = self.activation["kind"]
        if kind == "relu":
            return pre.relu()
        if kind == "jumprelu":
            return pre * (pre > self.threshold)
        if kind == "topk":
            r = pre.relu()
            v, i = r.topk(int(self.activation["k"]), dim=-1)
            return torch.zeros_like(r).scatter(-1, i, v)
        raise FormatError(f"activation {kind} is not supported for attribution (convert BatchTopK to JumpReLU first)")


def coder_paths(path):
    if path.endswith(".safetensors") or path.endswith(".json"):
        base = path.rsplit(".", 1)[0]
        return base + ".safetensors", base + ".json"
    return os.path.join(path, "coder.safetensors"), os.path.join(path, "coder.json")


def load_coders(paths, model, device):
    """Model layer -> LayerCoder, from transcoder / skip-transcoder files or cross-layer transcoders. Run-time
    scales (1 in saved files, which fold them) are folded here: the coder sees x·s_in and predicts y·s_out."""
    out = {}
    for path in paths:
        st, js = coder_paths(path)
        with open(js) as f:
            c = json.load(f)
        if c.get("format") != "transcoders.coder":
            raise FormatError(f"{js}: not a coder config (format {c.get('format')!r})")
        arch, layers = c["architecture"], c["layers"]
        if arch not in ("transcoder", "skip_transcoder", "cross_layer_transcoder"):
            raise FormatError(f"{js}: a {arch} does not replace MLPs")
        if c.get("input_bias"):
            raise FormatError(f"{js}: input_bias is set; saved transcoders fold it into b_enc")
        for l, hi, ho in zip(layers, c["hook_names_in"], c["hook_names_out"]):
            if hi != f"blocks.{l}.ln2.hook_normalized" or ho != f"blocks.{l}.hook_mlp_out":
                raise FormatError(f"{js}: layer {l} reads {hi} and writes {ho}; attribution needs the MLP input and output")
            if l < 0 or l >= model.n_layers:
                raise FormatError(f"{js}: layer {l} is outside the model's 0..{model.n_layers - 1}")
            if l in out:
                raise FormatError(f"{js}: layer {l} already has a coder")
        if c["d_in"] != model.d or c["d_out"] != model.d:
            raise FormatError(f"{js}: d_in {c['d_in']}, d_out {c['d_out']} do not fit d_model {model.d}")
        w, _ = read_safetensors(st)
        w = {k: v.to(device=device, dtype=torch.float32) for k, v in w.items()}
        s_in, s_out = c["scale"]["in"], c["scale"]["out"]
        if arch == "cross_layer_transcoder":
            n = len(layers)
            for i, l in enumerate(layers):
                decs = {layers[j]: w[f"W_dec_{i}"][:, j - i, :] / s_out[j] for j in range(i, n)}
                out[l] = LayerCoder(l, w["W_enc"][i] * s_in[i], w["b_enc"][i],
                                    w["threshold"][i] if "threshold" in w else None,
                                    decs, w["b_dec"][i] / s_out[i], None, c["activation"])
        else:
            l = layers[0]
            skip = w["W_skip"] * (s_in[0] / s_out[0]) if "W_skip" in w else None
            out[l] = LayerCoder(l, w["W_enc"] * s_in[0], w["b_enc"], w.get("threshold"), {l: w["W_dec"] / s_out[0]},
                                w["b_dec"] / s_out[0], skip, c["activation"])
    return out


# ---------------------------------------------------------------------------------------------------------
# attribution


def compute_partial_influences(edge_matrix, logit_p, row_to_node_index, max_iter=128):
    m = edge_matrix.abs()
    m /= m.sum(dim=1, keepdim=True).clamp(min=1e-8)
    influences = torch.zeros(edge_matrix.shape[1], device=m.device)
    prod = torch.zeros(edge_matrix.shape[1], device=m.device)
    prod[-len(logit_p):] = logit_p
    for _ in range(max_iter):
        prod = prod[row_to_node_index] @ m
        if not prod.any():
            break
        influences += prod
    else:
        raise RuntimeError("partial influences did not converge")
    return influences


def normalize_matrix(a):
    n = a.abs()
    return n / n.sum(dim=1, keepdim=True).clamp(min=1e-10)


def compute_influence(a, w, max_iter=1000):
    cur = w @ a
    infl = cur
    it = 0
    while cur.any():
        if it >= max_iter:
            raise RuntimeError("influence did not converge")
        cur = cur @ a
        infl = infl + cur
        it += 1
    return infl


def find_threshold(scores, threshold):
    s = torch.sort(scores, descending=True).values
    cum = torch.cumsum(s, dim=0) / torch.sum(s)
    i = int(torch.searchsorted(cum, torch.tensor([threshold], device=cum.device, dtype=cum.dtype)).item())
    n_nonzero = int((s > 0).sum().item())
    return s[min(i, max(n_nonzero - 1, 0))]


def prune(adj, logit_p, n_features, n_tokens, node_threshold, edge_threshold):
    """circuit-tracer's prune_graph: (node mask, edge mask)."""
    n_logits = len(logit_p)
    w = torch.zeros(adj.shape[0], device=adj.device)
    w[-n_logits:] = logit_p
    node_infl = compute_influence(normalize_matrix(adj), w)
    node_mask = node_infl >= find_threshold(node_infl, node_threshold)
    node_mask[-n_logits - n_tokens:] = True
    pruned = adj.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    norm = normalize_matrix(pruned)
    infl = compute_influence(norm, w) + w
    scores = norm * infl[:, None]
    edge_mask = scores >= find_threshold(scores.flatten(), edge_threshold)
    old = node_mask.clone()
    node_mask[: -n_logits - n_tokens] &= edge_mask[:, : -n_logits - n_tokens].any(0)
    node_mask[:n_features] &= edge_mask[:n_features].any(1)
    while not torch.all(node_mask == old):
        old[:] = node_mask
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[: -n_logits - n_tokens] &= edge_mask[:, : -n_logits - n_tokens].any(0)
        node_mask[:n_features] &= edge_mask[:n_features].any(1)
    return node_mask, edge_mask


class Attribution:
    """Builds the graph of one prompt (see the module docstring)."""

    def __init__(self, model, coders, batch_size, max_feature_nodes, max_n_logits, desired_logit_prob,
                 update_interval, zero_first_position, embed_with_positions, prune_graph, node_threshold,
                 edge_threshold, causal_cone=False):
        self.m, self.coders = model, coders
        self.batch_size, self.max_feature_nodes = batch_size, max_feature_nodes
        self.max_n_logits, self.desired_logit_prob = max_n_logits, desired_logit_prob
        self.update_interval, self.zero_first_position = update_interval, zero_first_position
        self.embed_with_positions, self.prune_graph = embed_with_positions, prune_graph
        self.node_threshold, self.edge_threshold = node_threshold, edge_threshold
        self.causal_cone = causal_cone

    def sync(self):
        if self.m.device.type == "cuda":
            torch.cuda.synchronize()

    def build(self, tokens):
        m, L = self.m, self.m.n_layers
        dev = m.device
        tokens = torch.tensor(tokens, dtype=torch.long, device=dev)
        T = tokens.shape[0]
        if T == 0 or T > m.n_ctx:
            raise ValueError(f"prompt of {T} tokens; the model takes 1..{m.n_ctx}")
        phases = {}
        t0 = time.perf_counter()

        # Phase 0: the real forward pass (one copy), the coders, the error vectors
        with torch.no_grad():
            x = m.embed_tokens(tokens)[None]
            tok_vecs = x[0].clone()
            pos = m.pos(T)
            if pos is not None:
                x = x + pos[None]
            scales1, scales2, patterns, mlp_in, mlp_out = [], [], [], [], []
            for l in range(L):
                s1 = m.scale(x)
                h = m.normed(x, f"blocks.{l}.ln1", s1)
                pat = m.pattern(h, l)
                x = x + m.attn_out(pat, m.values(h, l), l)
                s2 = m.scale(x)
                xin = m.normed(x, f"blocks.{l}.ln2", s2)
                y = m.mlp(xin, l)
                x = x + y
                scales1.append(s1); scales2.append(s2); patterns.append(pat)
                mlp_in.append(xin[0]); mlp_out.append(y[0])
            sf = m.scale(x) if m.final_norm else None
            final = m.normed(x, "ln_final", sf) if m.final_norm else x
            logits = m.unembed(final)[0, -1]

            # active features, sorted by (layer, position, feature)
            recon = [torch.zeros(T, m.d, device=dev) for _ in range(L)]
            feat_layer, feat_pos, feat_idx, feat_act, enc_vecs = [], [], [], [], []
            acts_by_layer = {}
            for l in range(L):
                c = self.coders.get(l)
                if c is None:
                    continue
                a = c.activations(mlp_in[l])
                if self.zero_first_position:
                    a[0] = 0
                acts_by_layer[l] = a
                p_i, f_i = a.nonzero(as_tuple=True)
                feat_layer.append(torch.full_like(p_i, l)); feat_pos.append(p_i); feat_idx.append(f_i)
                feat_act.append(a[p_i, f_i]); enc_vecs.append(c.w_enc[:, f_i].T)
            for l, a in acts_by_layer.items():
                c = self.coders[l]
                recon[l] = recon[l] + c.b_dec
                if c.w_skip is not None:
                    recon[l] = recon[l] + mlp_in[l] @ c.w_skip.T
                for t, dec in c.decoders.items():
                    recon[t] = recon[t] + a @ dec
            errors = [mlp_out[l] - recon[l] for l in range(L)]
            if self.zero_first_position:  # circuit-tracer zeroes the error vectors there too
                for err in errors:
                    err[0] = 0
            cat = lambda xs, shape: torch.cat(xs) if xs else torch.zeros(shape, device=dev)
            feat_layer = cat(feat_layer, (0,)).long(); feat_pos = cat(feat_pos, (0,)).long()
            feat_idx = cat(feat_idx, (0,)).long(); feat_act = cat(feat_act, (0,))
            enc_vecs = cat(enc_vecs, (0, m.d))
            n_feat = feat_layer.shape[0]
            # per (source layer, target layer): padded [T, maxn] tables of the active features' scaled decoders
            dec_tables = []
            for l, a in acts_by_layer.items():
                sel = (feat_layer == l).nonzero(as_tuple=True)[0]
                if sel.numel() == 0:
                    continue
                p_s, f_s, a_s = feat_pos[sel], feat_idx[sel], feat_act[sel]
                counts = torch.bincount(p_s, minlength=T)
                maxn = int(counts.max().item())
                starts = torch.cumsum(counts, 0) - counts
                slot = torch.arange(sel.numel(), device=dev) - starts[p_s]
                for t, dec in self.coders[l].decoders.items():
                    table = torch.zeros(T, maxn, m.d, device=dev)
                    table[p_s, slot] = a_s[:, None] * dec[f_s]
                    dec_tables.append((t, table.transpose(1, 2).contiguous(), p_s, slot, sel))
            if self.embed_with_positions and pos is not None:
                tok_vecs = tok_vecs + pos

            # logit targets: top logits up to the probability mass, at most max_n_logits; de-meaned unembedding
            probs = torch.softmax(logits, dim=-1)
            top_p, top_i = torch.topk(probs, min(self.max_n_logits, m.vocab))
            cutoff = int(torch.searchsorted(torch.cumsum(top_p, 0), torch.tensor([self.desired_logit_prob], device=dev)).item()) + 1
            logit_idx, logit_p = top_i[:cutoff], top_p[:cutoff]
            logit_vecs = m.W_U[logit_idx] - m.W_U.mean(0, keepdim=True)
        self.sync()
        phases["setup"] = time.perf_counter() - t0

        # Phase 1: the replacement forward pass over batch_size copies (frozen scales, patterns, MLP outputs) of the
        # first `prefix` positions, through the first `top` blocks (and the final norm when top = L)
        B = self.batch_size
        skip_const = [mlp_out[l] - mlp_in[l] @ self.coders[l].w_skip.T
                      if l in self.coders and self.coders[l].w_skip is not None else mlp_out[l] for l in range(L)]

        def replacement_forward(prefix, top):
            cut = lambda sc: None if sc is None else sc[:, :prefix]
            # x = embedding + position; the gradient at the embedding is the gradient at x
            embed_leaf = m.embed_tokens(tokens[:prefix])[None].expand(B, prefix, m.d).clone().requires_grad_(True)
            x = embed_leaf + pos[None, :prefix] if pos is not None else embed_leaf
            ins, out_leaves = [], []
            for l in range(min(top + 1, L)):
                h = m.normed(x, f"blocks.{l}.ln1", cut(scales1[l]))
                x = x + m.attn_out(patterns[l][:, :, :prefix, :prefix], m.values(h, l), l)
                xin = m.normed(x, f"blocks.{l}.ln2", cut(scales2[l]))
                ins.append(xin)
                if l == top:
                    break
                c = self.coders.get(l)
                leaf = skip_const[l][None, :prefix].expand(B, prefix, m.d).clone().requires_grad_(True)
                y = leaf if c is None or c.w_skip is None else leaf + xin @ c.w_skip.T
                x = x + y
                out_leaves.append(leaf)
            if top == L:
                ins.append(m.normed(x, "ln_final", cut(sf)) if m.final_norm else x)
            return embed_leaf, ins, out_leaves

        t1 = time.perf_counter()
        shared = None if self.causal_cone else replacement_forward(T, L)
        self.sync()
        phases["forward"] = time.perf_counter() - t1

        n_err = L * T
        logit_offset = n_feat + n_err + T
        n_logits = logit_idx.shape[0]
        total = logit_offset + n_logits
        max_feat = n_feat if self.max_feature_nodes is None else min(self.max_feature_nodes, n_feat)

        def rows_of(layers, positions, vecs, retain):
            """Attribution rows [n, logit_offset] of targets injected at (layer, position): one backward pass over
            the shared forward (circuit-tracer), or over a forward restricted to the batch's causal cone."""
            n = layers.shape[0]
            top = int(layers.max().item())
            if self.causal_cone:
                prefix = int(positions.max().item()) + 1
                embed_leaf, ins, out_leaves = replacement_forward(prefix, top)
                retain = False
            else:
                prefix = T
                embed_leaf, ins, out_leaves = shared
            outputs, grads_out = [], []
            for l in layers.unique().tolist():
                sel = (layers == l).nonzero(as_tuple=True)[0]
                g = torch.zeros(B, prefix, m.d, device=dev)
                g[sel, positions[sel]] = vecs[sel]
                outputs.append(ins[int(l)]); grads_out.append(g)
            wanted = [embed_leaf] + out_leaves[:min(top, L)]
            grads = torch.autograd.grad(outputs, wanted, grads_out, retain_graph=retain, allow_unused=True)
            ge, gl = grads[0], grads[1:]
            rows = torch.zeros(B, logit_offset, device=dev)
            for (t, table, p_s, slot, sel) in dec_tables:
                if t >= len(gl) or gl[t] is None:
                    continue
                if prefix < T:
                    keep = p_s < prefix
                    p_s, slot, sel = p_s[keep], slot[keep], sel[keep]
                r = torch.bmm(gl[t].transpose(0, 1), table[:prefix])  # [prefix, B, maxn]
                rows[:, sel] += r[p_s, :, slot].T
            for l in range(min(top, L)):
                if gl[l] is not None:
                    rows[:, n_feat + l * T: n_feat + l * T + prefix] = (gl[l] * errors[l][None, :prefix]).sum(-1)
            if ge is not None:
                rows[:, n_feat + n_err: n_feat + n_err + prefix] = (ge * tok_vecs[None, :prefix]).sum(-1)
            return rows[:n]

        t2 = time.perf_counter()
        edge = torch.zeros(max_feat + n_logits, total, device=dev)
        row_to_node = torch.zeros(max_feat + n_logits, dtype=torch.long, device=dev)
        for i in range(0, n_logits, B):
            k = min(B, n_logits - i)
            edge[i:i + k, :logit_offset] = rows_of(torch.full((k,), L, device=dev), torch.full((k,), T - 1, device=dev),
                                                   logit_vecs[i:i + k], True)
            row_to_node[i:i + k] = torch.arange(i, i + k, device=dev) + logit_offset
        self.sync()
        phases["logits"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        st = n_logits
        visited = torch.zeros(n_feat, dtype=torch.bool, device=dev)
        n_visited = 0
        while n_visited < max_feat:
            if max_feat == n_feat:
                pending = torch.arange(n_feat, device=dev)
            else:
                infl = compute_partial_influences(edge[:st], logit_p, row_to_node[:st])
                rank = torch.argsort(infl[:n_feat], descending=True)
                q = min(self.update_interval * B, max_feat - n_visited)
                pending = rank[~visited[rank]][:q]
            if self.causal_cone:  # tight cones: batch neighbours in position, then layer (as ours)
                key = (feat_pos[pending] * (L + 1) + feat_layer[pending]) * (n_feat + 1) + pending
                pending = pending[torch.argsort(key)]
            for j in range(0, pending.shape[0], B):
                idx = pending[j:j + B]
                n_visited += idx.shape[0]
                r = rows_of(feat_layer[idx], feat_pos[idx], enc_vecs[idx], n_visited < max_feat)
                edge[st:st + idx.shape[0], :logit_offset] = r
                row_to_node[st:st + idx.shape[0]] = idx
                visited[idx] = True
                st += idx.shape[0]
        self.sync()
        phases["features"] = time.perf_counter() - t3

        # packaging: rows in node order, columns restricted to the visited features
        t4 = time.perf_counter()
        selected = visited.nonzero(as_tuple=True)[0]
        if max_feat < n_feat:
            cols = torch.cat([selected, torch.arange(n_feat, total, device=dev)])
            edge = edge[:, cols]
        edge = edge[row_to_node.argsort()]
        N = edge.shape[1]
        adj = torch.zeros(N, N, device=dev)
        adj[:max_feat] = edge[:max_feat]
        adj[N - n_logits:] = edge[max_feat:]
        del edge
        n_edges = int((adj != 0).sum().item())
        self.sync()
        phases["package"] = time.perf_counter() - t4

        result = {"active_features": n_feat, "features": int(max_feat), "errors": n_err, "tokens": T,
                  "logits": n_logits, "nodes": N, "edges": n_edges}
        graph = {"adjacency": adj, "features": torch.stack([feat_layer[selected], feat_pos[selected], feat_idx[selected]], 1),
                 "activations": feat_act[selected], "logit_tokens": logit_idx, "logit_probabilities": logit_p}
        if self.prune_graph:
            t5 = time.perf_counter()
            node_mask, edge_mask = prune(adj, logit_p, max_feat, T, self.node_threshold, self.edge_threshold)
            result["pruned_nodes"] = int(node_mask.sum().item())
            result["pruned_edges"] = int(edge_mask.sum().item())
            self.sync()
            phases["prune"] = time.perf_counter() - t5
            graph["pruned_nodes"] = node_mask.nonzero(as_tuple=True)[0]
            graph["pruned_edges"] = edge_mask.nonzero()  # [E, 2]: (target, source)
        result["phases"] = phases
        return result, graph


# ---------------------------------------------------------------------------------------------------------


def rss_mib(field="VmRSS"):
    """VmRSS (resident now) or VmHWM (peak since the start or the last reset_peak) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak():
    """Resets the kernel's resident high-water mark (VmHWM) to the current resident size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def matmul(device, n, reps):
    x = torch.randn(n, n, device=device)
    y = torch.randn(n, n, device=device)
    (x @ y).sum().item()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        z = x @ y
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(2.0 * n ** 3 / (time.perf_counter() - t0) / 1e9)
        del z
    return out


def build(attr, tokens, reps, save):
    seconds, result, graph = [], None, None
    for _ in range(max(1, reps)):
        graph = None
        attr.sync()
        t0 = time.perf_counter()
        result, graph = attr.build(tokens)
        attr.sync()
        seconds.append(time.perf_counter() - t0)
    if save:
        write_safetensors(save, {k: (v.float() if v.is_floating_point() else v.long()) for k, v in graph.items()},
                          {"format": "graph_build.py adjacency", "rows": "targets", "columns": "sources"})
    return {**result, "seconds": seconds}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="our checkpoint folder (config.json + model.safetensors)")
    p.add_argument("--coders", nargs="+", required=True, help="coder folders or name.safetensors paths")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-feature-nodes", type=int, default=0, help="0: every active feature")
    p.add_argument("--max-n-logits", type=int, default=10)
    p.add_argument("--desired-logit-prob", type=float, default=0.95)
    p.add_argument("--update-interval", type=int, default=4)
    p.add_argument("--zero-first-position", action="store_true",
                   help="zero the coder activations and error vectors at position 0 (the attention sink), as circuit-tracer")
    p.add_argument("--embed-with-positions", action="store_true", help="token nodes carry token + position embedding")
    p.add_argument("--causal-cone", action="store_true",
                   help="one forward per batch over its causal cone (positions up to the last target, blocks below the "
                        "highest target layer), batches ordered by position: Transcoders' GraphConfig.CausalCone")
    p.add_argument("--prune", action="store_true")
    p.add_argument("--node-threshold", type=float, default=0.8)
    p.add_argument("--edge-threshold", type=float, default=0.98)
    p.add_argument("--tokens", help="comma-separated token ids (standalone mode)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--save", help="write the adjacency (standalone mode)")
    p.add_argument("--server", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    model = Model(a.model, device)
    coders = load_coders(a.coders, model, device)
    attr = Attribution(model, coders, a.batch_size, a.max_feature_nodes or None, a.max_n_logits,
                       a.desired_logit_prob, a.update_interval, a.zero_first_position, a.embed_with_positions,
                       a.prune, a.node_threshold, a.edge_threshold, a.causal_cone)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
            "layers_with_coders": sorted(coders.keys())}
    if not a.server:
        tokens = [int(t) for t in a.tokens.split(",")]
        print(json.dumps({**info, **build(attr, tokens, a.reps, a.save)}))
        return
    print(json.dumps({"ready": True, **info}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        c = cmd["cmd"]
        try:
            if c == "build":
                cap = attr.max_feature_nodes
                if "max_feature_nodes" in cmd:
                    attr.max_feature_nodes = int(cmd["max_feature_nodes"]) or None
                try:
                    out = build(attr, cmd["tokens"], int(cmd.get("reps", 1)), cmd.get("save"))
                finally:
                    attr.max_feature_nodes = cap
            elif c == "matmul":
                out = {"gflops": matmul(device, int(cmd.get("n", 1024)), int(cmd.get("reps", 5)))}
            elif c == "memory":
                out = {"rss_mib": rss_mib(), "peak_rss_mib": rss_mib("VmHWM"),
                       "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                       "cuda_peak_mib": torch.cuda.max_memory_allocated() / 1048576.0 if device.type == "cuda" else 0.0}
            elif c == "reset_peak":
                reset_peak()
                out = {"rss_mib": rss_mib()}
            elif c == "quit":
                break
            else:
                out = {"error": "unknown command " + c}
        except Exception as e:  # report, keep serving
            out = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
