#!/usr/bin/env python3
"""Train Fast KVzip gates (arXiv 2601.17668) for any Hugging Face Llama-family checkpoint.

Forward-only recipe (eviction-methods.md 5.2; FastKVzip train_gate.sh / optim.py):
1. the frozen LLM prefills each context and the KVzip reconstruction forwards run on top of it
   ("\\n\\nRepeat the previous context exactly." + the context, chunks of 2000 tokens), exactly
   as kvgate's kvzip policy does (gates/kvzip.cc, kv/policy_planner.cc). The KVzip
   score of (layer, kv head, token) = max over the group's query heads and the reconstruction
   queries of the attention probability (softmax over sink | chunk | own keys) is the soft
   target; the layer's attention input (post input-RMSNorm hidden states) is the feature;
2. every layer's gate (kvgate.fast_kvzip.v1: low-rank sink attention, rank 16, 16 sinks) is fit
   to its targets with binary cross-entropy (mean over tokens, sum over kv heads, sum over
   layers), SGD momentum 0.9, lr 0.2, 1000-token batches, the authors' step schedule (0.01*step
   warm-up over the first 1%, 1.0 until 50%, 0.5 until 75%, then 0.25). No gradient ever passes
   through the LLM. Every 100th token is held out for validation (BCE and the authors' metric:
   agreement of score >= 0.05 with target >= 0.05).
The gate's b is added to the logit ONCE, as the inference code (and kvgate) does.

Contexts: the first --context-tokens tokens of consecutive pieces of the --data text files
(BOS first), tokenized with the model's tokenizer.json (HF `tokenizers` if importable, else our
pure-Python BPE, gate_tokenizer.py), or --data self:N to sample N contexts from the model itself
(temperature 0.8, as bench/eval_kl does; in-distribution for small story models). By default the
context is capped so that context + reconstruction (about 2x context) stays within
max_position_embeddings (--allow-beyond-context lifts that).

Outputs --out (our gate file) and <out without .safetensors>.log.jsonl (one JSON record per
logged step: step, lr, loss per layer, time; a header and a final validation record).

    python3 gates/train/train_fast_kvzip_gate.py --model ../shared/models/tinystories-656k \\
        --data self:256 --context-tokens 248 --steps 5000 --out fast_kvzip.safetensors --device cuda
"""

import argparse
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import gate_common as gc  # noqa: E402
import gate_tokenizer  # noqa: E402
import llama_torch as lt  # noqa: E402

TRAINER = "gates/train/train_fast_kvzip_gate.py v1"


def lr_multiplier(step, steps):
    """optim.py: 0.01*step for the first 1% of steps, 1 until 50%, 0.5 until 75%, then 0.25."""
    if step < 0.01 * steps:
        return min(1.0, 0.01 * (step + 1))
    if step < 0.5 * steps:
        return 1.0
    if step < 0.75 * steps:
        return 0.5
    return 0.25


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF checkpoint dir (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--data", nargs="*",
                   help="text files/globs (default ../shared/data/pg-essays/*.txt), self:N, or *.json token-id lists")
    p.add_argument("--context-tokens", type=int, default=2000, help="tokens per context (BOS included)")
    p.add_argument("--allow-beyond-context", action="store_true",
                   help="do not cap context + reconstruction at max_position_embeddings")
    p.add_argument("--max-contexts", type=int, default=0, help="use at most this many contexts (0 = all)")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-tokens", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--sinks", type=int, default=16)
    p.add_argument("--skip-first", type=int, default=4,
                   help="leave the first tokens of every context out of the fit (always kept as sinks)")
    p.add_argument("--dump-contexts", help="also write the token ids of the contexts used (JSON) here")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="LLM dtype: float32, bfloat16, float16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    gc.seed_everything(args.seed)
    device = gc.resolve_device(args.device)
    t0 = time.time()
    model, config = lt.load_hf_checkpoint(args.model, device=device, dtype=gc.dtype_from_name(args.dtype))
    for prm in model.parameters():
        prm.requires_grad_(False)
    tok_path = os.path.join(args.model, "tokenizer.json")
    tokenizer = gate_tokenizer.load_tokenizer(tok_path) if os.path.exists(tok_path) else None
    if tokenizer is None:
        raise SystemExit("%s has no tokenizer.json (needed for the reconstruction prompt)" % args.model)
    repeat_all = tokenizer.encode(gc.KVZIP_REPEAT_ALL, add_special_tokens=False)
    repeat_from = tokenizer.encode(gc.KVZIP_REPEAT_FROM, add_special_tokens=False)

    length = args.context_tokens
    if not args.allow_beyond_context:
        # context n + reconstruction (len(repeat) + n) <= max_position_embeddings
        cap = (config.max_position_embeddings - len(repeat_all)) // 2
        if length > cap:
            print("context capped at %d tokens so the reconstruction stays within %d positions"
                  % (cap, config.max_position_embeddings))
            length = cap
    contexts, data_desc = gc.load_contexts(args, model, config, tokenizer, device, length)

    log = gc.JsonLog(gc.log_path_for(args.out))
    log.write({"event": "start", "trainer": TRAINER, "model": os.path.abspath(args.model),
               "data": data_desc, "contexts": len(contexts), "context_tokens": length, "steps": args.steps,
               "batch_tokens": args.batch_tokens, "lr": args.lr, "momentum": args.momentum, "rank": args.rank,
               "sinks": args.sinks, "seed": args.seed, "device": str(device), "torch": torch.__version__,
               "tokenizer": tokenizer.name, "repeat_tokens": len(repeat_all)}, echo=not args.quiet)

    # 1. features and targets, forward only.
    feats, targs = [], []
    for ctx in contexts:
        grid, x = gc.kvzip_scores(model, ctx, repeat_all, repeat_from)
        feats.append(x[:, args.skip_first:].float())           # [L, n', D]
        targs.append(grid[:, :, args.skip_first:].float())     # [L, H, n']
    X = torch.cat(feats, 1)                                     # [L, N, D]
    Y = torch.cat(targs, 2).transpose(1, 2).contiguous()        # [L, N, H]
    del feats, targs
    L, N, D = X.shape
    H = config.num_key_value_heads
    val_mask = torch.zeros(N, dtype=torch.bool, device=X.device)
    val_mask[::100] = True
    train_idx = (~val_mask).nonzero().view(-1)
    val_idx = val_mask.nonzero().view(-1)
    log.write({"event": "targets", "tokens": N, "train_tokens": int(train_idx.numel()), "val_tokens": int(val_idx.numel()),
               "target_mean": round(float(Y.mean()), 6),
               "target_mean_per_layer": [round(float(Y[l].mean()), 6) for l in range(L)],
               "target_frac_ge_0.05": round(float((Y >= 0.05).float().mean()), 6),
               "feature_seconds": round(time.time() - t0, 2)}, echo=not args.quiet)

    # 2. the gates.
    torch.manual_seed(args.seed)
    gates = torch.nn.ModuleList([gc.FastKvzipGateLayer(D, H, config.group_size, args.rank, args.sinks)
                                 for _ in range(L)]).to(device)
    opt = torch.optim.SGD(gates.parameters(), lr=args.lr, momentum=args.momentum)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)

    def layer_losses(idx):
        out = []
        for l in range(L):
            s = gates[l](X[l, idx]).clamp(1e-6, 1 - 1e-6)
            y = Y[l, idx]
            out.append(torch.nn.functional.binary_cross_entropy(s, y, reduction="none").mean(0).sum())
        return out

    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_multiplier(step, args.steps)
        pick = train_idx[torch.randint(0, train_idx.numel(), (min(args.batch_tokens, train_idx.numel()),), generator=gen)
                         .to(train_idx.device)]
        losses = layer_losses(pick)
        loss = sum(losses)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            log.write({"step": step, "lr": round(opt.param_groups[0]["lr"], 6), "loss": round(float(loss.detach()), 6),
                       "loss_per_layer": [round(float(x.detach()), 6) for x in losses]},
                      echo=not args.quiet and (step % (args.log_every * 10) == 0 or step == args.steps - 1))

    # 3. validation and export.
    with torch.no_grad():
        val = layer_losses(val_idx)
        agree, corr = [], []
        for l in range(L):
            s = gates[l](X[l, val_idx])
            y = Y[l, val_idx]
            agree.append(round(float(((s >= 0.05) == (y >= 0.05)).float().mean()), 4))
            sc, yc = s.flatten() - s.mean(), y.flatten() - y.mean()
            corr.append(round(float((sc * yc).sum() / (sc.norm() * yc.norm() + 1e-12)), 4))
    record = {"event": "final", "val_loss": round(float(sum(val)), 6), "val_loss_per_layer": [round(float(x), 6) for x in val],
              "val_agreement_0.05_per_layer": agree, "val_pearson_per_layer": corr,
              "train_seconds": round(time.time() - t0, 2)}
    log.write(record, echo=not args.quiet)
    gc.save_fast_kvzip(args.out, list(gates), config, {
        "source": os.path.basename(os.path.normpath(args.model)), "source_sha256": gc.model_sha256(args.model),
        "converter": TRAINER, "training_data": data_desc, "training_steps": args.steps,
        "context_tokens": length, "seed": args.seed})
    log.close()
    if not args.quiet:
        print("wrote %s and %s" % (args.out, gc.log_path_for(args.out)))
    return record


if __name__ == "__main__":
    main()
