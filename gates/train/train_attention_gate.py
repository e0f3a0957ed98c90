#!/usr/bin/env python3
"""Train Attention-Gate gates (our design, gates/README.md) on a frozen Hugging Face Llama-family
checkpoint, with in-context eviction in the loop.

Every layer gets the gate of the kvgate.attention_gate.v1 format (causal MHA' of h' heads x d'
dims without RoPE over the layer's attention input, read-out of [o_t ; v_t] to one logit per kv
head; keep when sigmoid(logit) > threshold). Training runs the frozen model with the gates'
decisions inside the forward, exactly as kvgate's prefill does (AttentionGatePrefillKeyMask):

- in layer l, before its attention, the gate reads that layer's input x (post input-RMSNorm,
  itself produced by the already-masked lower layers) and flags every token per kv head;
- a flagged-out key is invisible to every later query of that kv head (a token always sees
  itself); the first --sink tokens are always visible (kvgate's default sink of 4);
- the forward uses the HARD flags; gradients pass with a straight-through estimator
  (keep = hard + sigmoid(z) - sigmoid(z).detach()), through the frozen LLM, into the gates.

Loss = LM loss + rate_weight * |mean keep - target|, where
- LM loss is KL(full-cache model || gated model) of the next-token distributions at every
  position (--lm-loss kl, default: what bench/eval_kl measures), or next-token cross-entropy
  (--lm-loss ce);
- mean keep is over layers, kv heads and the non-sink tokens of the batch (hard values in the
  forward, sigmoid gradients in the backward); the target ramps linearly from 1 to
  --target-keep over the first --rate-warmup of the steps so the gates start from the full
  cache and learn what to drop gradually.
Only the gates are trained (AdamW). Held-out contexts give a final validation record: KL and
keep rate of the gates, and KL of random eviction at the same per-(layer, head) keep rate.

--focus-text TEXT --focus-weight W weight the LM loss of chosen positions: the predictions of
the tokens after each occurrence of TEXT's tokens, up to and including the next <eos> (with
'Answer:', the answers of the retrieval prompts of bench/retrieval_tasks.md), count W times;
the loss is then the weighted mean over positions. The validation record adds the KL and the
top-1 agreement with the full model at those positions alone.

Outputs --out and <out without .safetensors>.log.jsonl (one JSON record per logged step:
step, loss, kl/ce, keep rate overall and per layer, time).

    python3 gates/train/train_attention_gate.py --model ../shared/models/tinystories-656k \\
        --data self:512 --context-tokens 512 --steps 2000 --target-keep 0.3 \\
        --out attention_gate.safetensors --device cuda
"""

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import gate_common as gc  # noqa: E402
import gate_tokenizer  # noqa: E402
import llama_torch as lt  # noqa: E402

TRAINER = "gates/train/train_attention_gate.py v1"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", nargs="*",
                   help="text files/globs (default ../shared/data/pg-essays/*.txt), self:N, or *.json token-id lists")
    p.add_argument("--context-tokens", type=int, default=512, help="tokens per sequence (capped at max_position_embeddings)")
    p.add_argument("--max-contexts", type=int, default=0)
    p.add_argument("--val-contexts", type=int, default=16, help="contexts held out for validation")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--time-budget", type=float, default=0,
                   help="seconds of training: after timing steps 2..6, cut --steps to what fits (0 = off)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--target-keep", type=float, default=0.3)
    p.add_argument("--rate-weight", type=float, default=2.0)
    p.add_argument("--rate-warmup", type=float, default=0.3, help="fraction of steps over which the target ramps from 1")
    p.add_argument("--lm-loss", choices=("kl", "ce"), default="kl")
    p.add_argument("--focus-text", help="weight the predictions after each occurrence of this text, up to and "
                   "including the next eos (e.g. 'Answer:' for retrieval prompts)")
    p.add_argument("--focus-weight", type=float, default=1.0, help="loss weight of the --focus-text positions")
    p.add_argument("--gate-heads", type=int, default=2)
    p.add_argument("--gate-head-dim", type=int, default=16)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--bias-init", type=float, default=2.0, help="initial read-out bias (sigmoid(2) = 0.88: keep all)")
    p.add_argument("--sink", type=int, default=4, help="first tokens always visible (kvgate's default sink)")
    p.add_argument("--dump-contexts", help="also write the token ids of the contexts used (JSON) here")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


class GatedForward:
    """key_mask_fn for llama_torch: hard flags forward, straight-through gradients."""

    def __init__(self, gates, threshold, sink, mode="ste", random_keep=None, generator=None):
        self.gates, self.sink, self.mode = gates, sink, mode
        self.z_threshold = math.log(threshold / (1 - threshold))
        self.random_keep = random_keep   # [L, H] keep probabilities for mode "random"
        self.generator = generator
        self.keeps = []

    def __call__(self, layer, x):
        b, t, _ = x.shape
        if self.mode == "random":
            prob = self.random_keep[layer].view(1, -1, 1).expand(b, -1, t)
            keep = (torch.rand(prob.shape, generator=self.generator).to(x.device) < prob.cpu().to(x.device)).float()
        else:
            z = self.gates[layer](x)                               # [B, H, T]
            p = torch.sigmoid(z - self.z_threshold)                 # > 0.5 <=> sigmoid(z) > threshold
            hard = (z > self.z_threshold).float()
            keep = hard + p - p.detach() if self.mode == "ste" else hard
        if self.sink > 0:
            prot = torch.zeros(t, dtype=torch.bool, device=x.device)
            prot[:self.sink] = True
            keep = torch.where(prot.view(1, 1, t), torch.ones_like(keep), keep)
        self.keeps.append(keep[..., self.sink:])
        return keep


def kl_full_vs(ref_logp, logits, weights=None):
    """mean over positions of KL(p_full || q), ref_logp = log_softmax of the full model;
    weights [B, T] make it the weighted mean."""
    logq = torch.log_softmax(logits.float(), -1)
    kl = (ref_logp.exp() * (ref_logp - logq)).sum(-1)
    if weights is None:
        return kl.mean()
    return (kl * weights).sum() / weights.sum()


def focus_mask(ids, focus_ids, eos_id):
    """[N, T] bool: position t predicts token t+1, which lies after an occurrence of focus_ids
    and at or before the next eos (or the end)."""
    n, t = ids.shape
    mask = torch.zeros(n, t, dtype=torch.bool)
    f = len(focus_ids)
    rows = ids.tolist()
    for b, row in enumerate(rows):
        i = 0
        while i + f <= t:
            if row[i:i + f] == focus_ids:
                j = i + f                      # first focused target token
                while j < t:
                    mask[b, j - 1] = True
                    if row[j] == eos_id:
                        break
                    j += 1
                i = j
            else:
                i += 1
    return mask


def main(argv=None):
    args = parse_args(argv)
    gc.seed_everything(args.seed)
    device = gc.resolve_device(args.device)
    t0 = time.time()
    model, config = lt.load_hf_checkpoint(args.model, device=device, dtype=gc.dtype_from_name(args.dtype))
    model.use_sdpa = True
    for prm in model.parameters():
        prm.requires_grad_(False)
    tok_path = os.path.join(args.model, "tokenizer.json")
    tokenizer = gate_tokenizer.load_tokenizer(tok_path) if os.path.exists(tok_path) else None
    length = min(args.context_tokens, config.max_position_embeddings)
    contexts, data_desc = gc.load_contexts(args, model, config, tokenizer, device, length)
    if len(contexts) < 2:
        raise SystemExit("need at least 2 contexts")
    n_val = min(args.val_contexts, max(1, len(contexts) // 5))
    data = torch.tensor(contexts, dtype=torch.long)
    val, train = data[:n_val], data[n_val:]
    focus = None   # [N, T] float loss weights, or None
    if args.focus_text:
        if tokenizer is None:
            raise SystemExit("--focus-text needs the model's tokenizer.json")
        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
        focus = focus_mask(data, tokenizer.encode(args.focus_text, add_special_tokens=False), eos)
        if not focus.any():
            raise SystemExit("--focus-text %r occurs in no context" % args.focus_text)
        weights = 1.0 + (args.focus_weight - 1.0) * focus.float()
        val_focus, train_weights = focus[:n_val], weights[n_val:]

    L, H = config.num_hidden_layers, config.num_key_value_heads
    torch.manual_seed(args.seed)
    gates = torch.nn.ModuleList([gc.AttentionGateLayer(config.hidden_size, H, args.gate_heads, args.gate_head_dim,
                                                       args.bias_init) for _ in range(L)]).to(device)
    opt = torch.optim.AdamW(gates.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    log = gc.JsonLog(gc.log_path_for(args.out))
    log.write({"event": "start", "trainer": TRAINER, "model": os.path.abspath(args.model), "data": data_desc,
               "train_contexts": int(train.shape[0]), "val_contexts": n_val, "context_tokens": length,
               "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "target_keep": args.target_keep,
               "rate_weight": args.rate_weight, "rate_warmup": args.rate_warmup, "lm_loss": args.lm_loss,
               "gate_heads": args.gate_heads, "gate_head_dim": args.gate_head_dim, "threshold": args.threshold,
               "sink": args.sink, "seed": args.seed, "device": str(device), "torch": torch.__version__,
               "focus_text": args.focus_text, "focus_weight": args.focus_weight,
               "focus_positions": int(focus.sum()) if focus is not None else 0,
               "data_seconds": round(time.time() - t0, 2)}, echo=not args.quiet)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    warm = max(1, int(args.rate_warmup * args.steps))

    steps = args.steps
    step = 0
    while step < steps:
        if args.time_budget > 0 and step in (2, 7) and device.type == "cuda":
            torch.cuda.synchronize()
        if args.time_budget > 0 and step == 2:
            timing_start = time.time()
        if args.time_budget > 0 and step == 7:
            per_step = (time.time() - timing_start) / 5
            steps = max(8, min(args.steps, int(args.time_budget / per_step)))
            warm = max(1, int(args.rate_warmup * steps))
            log.write({"event": "time_budget", "seconds_per_step": round(per_step, 4), "steps": steps},
                      echo=not args.quiet)
        target = 1.0 - (1.0 - args.target_keep) * min(1.0, (step + 1) / warm)
        idx = torch.randint(0, train.shape[0], (min(args.batch_size, train.shape[0]),), generator=gen)
        ids = train[idx].to(device)
        gf = GatedForward(gates, args.threshold, args.sink, "ste")
        out = model(ids, key_mask_fn=gf)
        if args.lm_loss == "kl":
            with torch.no_grad():
                ref = torch.log_softmax(model(ids).logits.float(), -1)
            lm = kl_full_vs(ref, out.logits, train_weights[idx].to(device) if focus is not None else None)
        else:
            lm = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, config.vocab_size), ids[:, 1:].reshape(-1))
        keep = torch.stack([k.mean() for k in gf.keeps])          # per layer
        rate = keep.mean()
        loss = lm + args.rate_weight * (rate - target).abs()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == steps - 1:
            log.write({"step": step, "loss": round(float(loss.detach()), 6), args.lm_loss: round(float(lm.detach()), 6),
                       "keep": round(float(rate.detach()), 4), "target": round(target, 4),
                       "keep_per_layer": [round(float(k), 4) for k in keep.detach()]},
                      echo=not args.quiet and (step % (args.log_every * 10) == 0 or step == steps - 1))
        step += 1

    # Validation: the gates (hard) vs random eviction at the same per-(layer, head) keep rate.
    with torch.no_grad():
        vids = val.to(device)
        ref = torch.log_softmax(model(vids).logits.float(), -1)
        gf = GatedForward(gates, args.threshold, args.sink, "hard")
        logits_gate = model(vids, key_mask_fn=gf).logits
        kl_gate = float(kl_full_vs(ref, logits_gate))
        per_head = torch.stack([k.mean(dim=(0, 2)) for k in gf.keeps])   # [L, H]
        rnd = GatedForward(None, args.threshold, args.sink, "random", per_head,
                           torch.Generator(device="cpu").manual_seed(args.seed + 2))
        logits_random = model(vids, key_mask_fn=rnd).logits
        kl_random = float(kl_full_vs(ref, logits_random))
        if focus is not None and val_focus.any():
            vf = val_focus.to(device)
            top1_full = ref.argmax(-1)
            focus_record = {
                "val_focus_positions": int(vf.sum()),
                "val_kl_focus_gate": round(float(kl_full_vs(ref, logits_gate, vf.float())), 6),
                "val_kl_focus_random_same_rate": round(float(kl_full_vs(ref, logits_random, vf.float())), 6),
                "val_focus_top1_agree_gate": round(float((logits_gate.argmax(-1) == top1_full)[vf].float().mean()), 4),
                "val_focus_top1_agree_random": round(float((logits_random.argmax(-1) == top1_full)[vf].float().mean()), 4)}
        ce_full = float(F.cross_entropy(ref[:, :-1].reshape(-1, config.vocab_size), vids[:, 1:].reshape(-1)))
    record = {"event": "final", "val_kl_gate": round(kl_gate, 6), "val_kl_random_same_rate": round(kl_random, 6),
              "val_keep": round(float(per_head.mean()), 4),
              "val_keep_per_layer_head": [[round(float(v), 4) for v in row] for row in per_head],
              "val_ce_full": round(ce_full, 6), "steps": steps, "train_seconds": round(time.time() - t0, 2)}
    if focus is not None and val_focus.any():
        record.update(focus_record)
    log.write(record, echo=not args.quiet)
    gc.save_attention_gate(args.out, list(gates), config, args.threshold, {
        "source": os.path.basename(os.path.normpath(args.model)), "source_sha256": gc.model_sha256(args.model),
        "trainer": TRAINER, "training_data": data_desc, "training_steps": steps,
        "target_keep": args.target_keep, "context_tokens": length, "sink": args.sink, "seed": args.seed,
        **({"focus_text": args.focus_text, "focus_weight": args.focus_weight} if focus is not None else {})})
    log.close()
    if not args.quiet:
        print("wrote %s and %s" % (args.out, gc.log_path_for(args.out)))
    return record


if __name__ == "__main__":
    main()
