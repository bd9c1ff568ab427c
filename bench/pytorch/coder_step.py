#!/usr/bin/python3
"""The PyTorch side of the coder training-step benchmark (bench/Transcoders.Bench `coder`).

The same transcoder step as the library's CoderTraining.step: x·W_enc with an input bias (pre = (x − b_in)·W_enc + b_enc),
ReLU / TopK / BatchTopK / JumpReLU / GroupMax, decode ŷ = a·W_dec + b_dec, loss MSE (Σ over d, mean over tokens) + λ·L1
for ReLU or + λ·L0 for JumpReLU (step function, rectangle-kernel straight-through estimator for θ = exp(log θ), bandwidth
1e-3, θ₀ = 1e-3, as Gemma Scope and the library), the BatchTopK threshold's running average, backward,
removal of the decoder-gradient component parallel to each decoder row, Adam (lr 4e-4, β 0.9/0.999), renormalisation of
the decoder rows, firing statistics, and one host sync for the logged values (loss, L0, FVU).
Parameters and Adam are float32; with --dtype bf16/fp16 the products run in that dtype from cast copies (as autocast
does). --decode sparse decodes the k active features per token with a sparse product (torch.sparse.mm) and its
hand-written backward (the same algorithm as Transcoders.Coders.SparseDecode).

Server mode (used by the F# benchmark to interleave rounds): --server, then JSON lines on stdin:
  {"cmd": "train", "steps": N}  -> {"seconds": [...], "loss": L}
  {"cmd": "fwdbwd", "steps": N} -> {"seconds": [...]}        forward + loss + backward only
  {"cmd": "matmul", "n": 1024, "reps": R} -> {"gflops": [...]}
  {"cmd": "memory"}             -> {"rss_mib": ..., "peak_mib": ...}
  {"cmd": "quit"}
"""
import argparse
import json
import math
import resource
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def row_ids(b, k, device):
    return torch.arange(b, device=device).unsqueeze(1).expand(b, k).reshape(-1)


class SparseDecode(torch.autograd.Function):
    """y[b] = Σ_j v[b, j]·W[i[b, j]]; backward ∂W = Sᵀ·G (sparse), ∂v = gather(W)·G."""

    @staticmethod
    def forward(ctx, values, indices, w):
        ctx.save_for_backward(values, indices, w)
        b, k = indices.shape
        s = torch.sparse_coo_tensor(torch.stack([row_ids(b, k, w.device), indices.reshape(-1)]),
                                    values.reshape(-1).to(w.dtype), (b, w.shape[0]))
        return torch.sparse.mm(s, w)

    @staticmethod
    def backward(ctx, g):
        values, indices, w = ctx.saved_tensors
        b, k = indices.shape
        g = g.to(w.dtype)
        cols = indices.reshape(-1)
        st = torch.sparse_coo_tensor(torch.stack([cols, row_ids(b, k, w.device)]),
                                     values.reshape(-1).to(w.dtype), (w.shape[0], b))
        gw = torch.sparse.mm(st, g)
        gv = torch.bmm(w.index_select(0, cols).reshape(b, k, -1), g.unsqueeze(2)).squeeze(2)
        return gv.to(values.dtype), None, gw


def rectangle(u):
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    """a = z·H(z − θ); ∂z = H(z − θ)·g; ∂θ = −(θ/ε)·K((z − θ)/ε)·g summed over tokens."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        gt = (-(theta / eps) * rectangle((z - theta) / eps) * g).sum(0)
        return g * (z > theta), gt, None


class Step(torch.autograd.Function):
    """H(z − θ); no gradient to z; ∂θ = −(1/ε)·K((z − θ)/ε)·g summed over tokens."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        return None, (-(1.0 / eps) * rectangle((z - theta) / eps) * g).sum(0), None


class Bench:
    def __init__(self, a):
        self.a = a
        self.device = torch.device(a.device)
        self.dt = DTYPES[a.dtype]
        torch.manual_seed(a.seed)
        d, f, dev = a.d_model, a.width, self.device
        w_dec = torch.randn(f, d, device=dev)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        bound = math.sqrt(6.0 / f)
        self.w_enc = torch.empty(d, f, device=dev).uniform_(-bound, bound).requires_grad_()
        self.b_enc = torch.zeros(f, device=dev, requires_grad=True)
        self.w_dec = w_dec.requires_grad_()
        self.b_dec = torch.zeros(d, device=dev, requires_grad=True)
        self.b_in = torch.zeros(d, device=dev, requires_grad=True)
        self.params = [self.w_enc, self.b_enc, self.w_dec, self.b_dec, self.b_in]
        if a.activation == "jumprelu":
            self.log_threshold = torch.full((f,), math.log(1e-3), device=dev, requires_grad=True)
            self.params.append(self.log_threshold)
        self.batch_threshold = torch.full((), float("nan"), device=dev)
        self.opt = torch.optim.Adam(self.params, lr=4e-4, betas=(0.9, 0.999), eps=1e-8)
        self.since_fired = torch.zeros(f, dtype=torch.int64, device=dev)
        self.counts = torch.zeros(f, dtype=torch.int64, device=dev)
        self.pool = [(torch.randn(a.batch, d, device=dev), torch.randn(a.batch, d, device=dev)) for _ in range(4)]
        self.next = 0

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def cast(self, t):
        return t if self.dt == torch.float32 else t.to(self.dt)

    def forward_loss(self, x, y):
        a = self.a
        pre = self.cast(x - self.b_in) @ self.cast(self.w_enc) + self.cast(self.b_enc)
        active = None
        if a.activation == "relu":
            acts = pre.relu()
        elif a.activation == "jumprelu":
            acts = JumpReLU.apply(pre, self.log_threshold.exp().to(pre.dtype), 1e-3)
        elif a.activation == "batchtopk":
            r = pre.relu()
            flat = r.reshape(-1)
            v, i = flat.topk(max(1, min(flat.numel(), round(a.k * r.shape[0]))), sorted=False)
            acts = torch.zeros_like(flat).scatter(0, i, v).view_as(r)
            with torch.no_grad():
                pos = v[v > 0]
                if pos.numel() > 0:
                    m = pos.min().float()
                    self.batch_threshold = torch.where(self.batch_threshold.isnan(), m, 0.999 * self.batch_threshold + 0.001 * m)
        elif a.activation == "topk":
            if a.decode == "sparse":
                v, i = pre.topk(a.k, dim=-1, sorted=False)
                active = (v.relu(), i)
            else:
                r = pre.relu()
                v, i = r.topk(a.k, dim=-1, sorted=False)
                acts = torch.zeros_like(r).scatter(-1, i, v)
        else:  # groupmax
            v, i = pre.unflatten(-1, (a.k, -1)).max(dim=-1)
            i = i + torch.arange(0, a.width, a.width // a.k, device=pre.device)
            if a.decode == "sparse":
                active = (v.relu(), i)
            else:
                acts = torch.zeros_like(pre).scatter(-1, i, v.relu())
        if active is None:
            pred = (acts @ self.cast(self.w_dec)).float() + self.b_dec
            fired = acts.detach() > 0
        else:
            v, i = active
            pred = SparseDecode.apply(v.float(), i, self.w_dec) + self.b_dec
            fired = None
        loss = (pred - y).square().sum(-1).mean()
        if a.activation == "relu":
            loss = loss + a.lam * acts.abs().sum(-1).float().mean()
        elif a.activation == "jumprelu":
            loss = loss + a.lam * Step.apply(pre, self.log_threshold.exp().to(pre.dtype), 1e-3).sum(-1).float().mean()
        return loss, pred, fired, active

    def step(self, x, y):
        loss, pred, fired, active = self.forward_loss(x, y)
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        with torch.no_grad():
            g, w = self.w_dec.grad, self.w_dec
            g -= (g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True).clamp_min(1e-24) * w
        self.opt.step()
        with torch.no_grad():
            w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))
            if active is None:
                c = fired.sum(0)
                l0 = fired.sum(-1, dtype=torch.float32).mean()
            else:
                v, i = active
                f = (v.detach() > 0)
                c = torch.zeros_like(self.counts).scatter_add_(0, i.reshape(-1), f.reshape(-1).long())
                l0 = f.sum(-1, dtype=torch.float32).mean()
            self.counts += c
            self.since_fired += x.shape[0]
            self.since_fired.masked_fill_(c > 0, 0)
            fvu = (pred - y).square().sum() / (y - y.mean(0)).square().sum()
            return torch.stack([loss.detach().float(), l0, fvu.float()]).tolist()[0]

    def pick(self):
        x, y = self.pool[self.next % len(self.pool)]
        self.next += 1
        return x, y

    def train(self, steps):
        seconds, loss = [], float("nan")
        for _ in range(steps):
            x, y = self.pick()
            self.sync()
            t0 = time.perf_counter()
            loss = self.step(x, y)
            self.sync()
            seconds.append(time.perf_counter() - t0)
        return {"seconds": seconds, "loss": loss}

    def fwdbwd(self, steps):
        seconds = []
        for _ in range(steps):
            x, y = self.pick()
            self.sync()
            t0 = time.perf_counter()
            loss = self.forward_loss(x, y)[0]
            self.opt.zero_grad(set_to_none=False)
            loss.backward()
            self.sync()
            seconds.append(time.perf_counter() - t0)
        return {"seconds": seconds}

    def matmul(self, n, reps):
        x = torch.randn(n, n, device=self.device, dtype=self.dt)
        y = torch.randn(n, n, device=self.device, dtype=self.dt)
        (x @ y).sum().item()
        out = []
        for _ in range(reps):
            self.sync()
            t0 = time.perf_counter()
            z = x @ y
            self.sync()
            out.append(2.0 * n ** 3 / (time.perf_counter() - t0) / 1e9)
            del z
        return {"gflops": out}

    def memory(self):
        rss = float("nan")
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024.0
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 1048576.0
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        return {"rss_mib": rss, "peak_mib": peak}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--width", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--activation", choices=["relu", "topk", "batchtopk", "jumprelu", "groupmax"], default="relu")
    p.add_argument("--decode", choices=["dense", "sparse"], default="dense")
    p.add_argument("--lambda", dest="lam", type=float, default=1e-3)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--server", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    bench = Bench(a)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": a.dtype,
            "parameters": sum(t.numel() for t in bench.params)}
    if not a.server:
        bench.train(2)
        r = bench.train(a.steps)
        med = sorted(r["seconds"])[len(r["seconds"]) // 2]
        print(json.dumps({**info, "median_step_s": med, "tokens_per_s": a.batch / med, "loss": r["loss"]}))
        return
    print(json.dumps({"ready": True, **info}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        c = cmd["cmd"]
        try:
            if c == "train":
                out = bench.train(int(cmd["steps"]))
            elif c == "fwdbwd":
                out = bench.fwdbwd(int(cmd["steps"]))
            elif c == "matmul":
                out = bench.matmul(int(cmd.get("n", 1024)), int(cmd.get("reps", 10)))
            elif c == "memory":
                out = bench.memory()
            elif c == "quit":
                break
            else:
                out = {"error": "unknown command " + c}
        except Exception as e:  # report, keep serving
            out = {"error": "%s: %s" % (type(e).__name__, e)}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
