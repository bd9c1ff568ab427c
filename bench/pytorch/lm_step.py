#!/usr/bin/python3
"""The PyTorch side of the LM training-step benchmark (bench/Transcoders.Bench `lm`).

Same model and step as the F# side: a GPT-2-style pre-LN transformer (learned positions, gelu_new,
tied embedding, causal attention through F.scaled_dot_product_attention where this PyTorch has it,
else the explicit masked softmax of PyTorch < 2.0), AdamW with weight decay on >= 2-D parameters only,
gradient clipping to 1.0, one optimizer update per step on a [batch, context+1] window of random tokens.

Needs an optimised BLAS under Debian's PyTorch: `apt-get install python3-torch libopenblas0` (without
libopenblas0 the libblas.so.3 alternative is netlib's reference BLAS, ~30x slower matmuls).

Standalone:  OMP_WAIT_POLICY=PASSIVE /usr/bin/python3 bench/pytorch/lm_step.py --steps 10
Server mode (used by the F# benchmark to interleave rounds): --server, then JSON lines on stdin:
  {"cmd": "train", "steps": N}  -> {"seconds": [...per step...], "loss": L, "tokens_per_step": T}
  {"cmd": "matmul", "n": 1024, "reps": R} -> {"gflops": [...]}
  {"cmd": "memory"}             -> {"rss_mib": ..., "peak_rss_mib": ...}
  {"cmd": "quit"}
"""
import argparse
import json
import math
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HAS_SDPA = hasattr(F, "scaled_dot_product_attention")


class Block(nn.Module):
    def __init__(self, d, heads, context):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.attn_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)
        if not HAS_SDPA:
            self.register_buffer("mask", torch.tril(torch.ones(context, context, dtype=torch.bool)), persistent=False)

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        if HAS_SDPA:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // h))
            att = att.masked_fill(~self.mask[:t, :t], float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class Gpt(nn.Module):
    def __init__(self, layers, d, heads, context, vocab):
        super().__init__()
        self.vocab = vocab
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.blocks = nn.ModuleList([Block(d, heads, context) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "ln" not in name:
                nn.init.normal_(p, 0.0, 0.02)
        for blk in self.blocks:
            for proj in (blk.attn_proj, blk.mlp_proj):
                nn.init.normal_(proj.weight, 0.0, 0.02 / math.sqrt(2 * layers))

    def forward(self, tokens):
        t = tokens.shape[1]
        x = self.wte(tokens) + self.wpe(torch.arange(t, device=tokens.device))
        for blk in self.blocks:
            x = blk(x)
        return self.ln_f(x) @ self.wte.weight.t()

    def loss(self, window):
        logits = self(window[:, :-1])
        return F.cross_entropy(logits.reshape(-1, self.vocab), window[:, 1:].reshape(-1))


class Bench:
    def __init__(self, a):
        self.a = a
        self.device = torch.device(a.device)
        torch.manual_seed(a.seed)
        self.model = Gpt(a.layers, a.d_model, a.heads, a.context, a.vocab).to(self.device)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        plain = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}],
            lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
        self.step_index = 0

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self):
        a = self.a
        g = torch.Generator().manual_seed(a.seed * 1_000_003 + self.step_index)
        window = torch.randint(0, a.vocab, (a.batch, a.context + 1), generator=g).to(self.device)
        self.step_index += 1
        self.opt.zero_grad(set_to_none=True)
        loss = self.model.loss(window)
        loss.backward()
        value = loss.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return value

    def train(self, steps):
        seconds, loss = [], float("nan")
        for _ in range(steps):
            self.sync()
            t0 = time.perf_counter()
            loss = self.step()
            self.sync()
            seconds.append(time.perf_counter() - t0)
        return {"seconds": seconds, "loss": loss, "tokens_per_step": self.a.batch * self.a.context}

    def matmul(self, n, reps):
        x = torch.randn(n, n, device=self.device)
        y = torch.randn(n, n, device=self.device)
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


def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--server", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    bench = Bench(a)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "sdpa": HAS_SDPA,
            "parameters": sum(p.numel() for p in bench.model.parameters())}
    if not a.server:
        bench.train(2)
        r = bench.train(a.steps)
        med = sorted(r["seconds"])[len(r["seconds"]) // 2]
        print(json.dumps({**info, "median_step_s": med, "tokens_per_s": r["tokens_per_step"] / med, "loss": r["loss"]}))
        return
    print(json.dumps({"ready": True, **info}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        c = cmd["cmd"]
        if c == "train":
            out = bench.train(int(cmd["steps"]))
        elif c == "matmul":
            out = bench.matmul(int(cmd.get("n", 1024)), int(cmd.get("reps", 10)))
        elif c == "memory":
            out = {"rss_mib": rss_mib(), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
        elif c == "quit":
            break
        else:
            out = {"error": "unknown command " + c}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
