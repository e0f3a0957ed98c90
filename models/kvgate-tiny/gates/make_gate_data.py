#!/usr/bin/env python3
"""Training contexts for the kvgate-tiny gates: token-id JSON (a list of id lists, the
`--data *.json` input of gates/train/train_{fast_kvzip,attention}_gate.py).

kvgate-tiny is a retrieval model, so its gates train on what it is used for: the prompts
of bench/retrieval_tasks.md (gates/train/tiny_data.py, the generator the model was trained
with: five tasks, essay haystack or the built-in five-sentence one, random depths), each
followed by its answer and <|eos|>, mixed with plain essay passages. Every context has
exactly --tokens ids (the trainers batch equal lengths): a task prompt fills --tokens minus
the 16-token margin, answer and <|eos|> follow, and the rest is the start of an essay
passage (<|bos|> + sentences). Keys, values, depths and passages come from this script's
own random stream (--seed), never from the C++ eval's seeds.

    python3 models/kvgate-tiny/gates/make_gate_data.py --model models/kvgate-tiny \\
        --haystack .carry/essays --tokens 2040 --count 128 --out contexts_2040.json
"""

import argparse
import collections
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.join(REPO, "gates", "train"))

import bpe_tokenizer  # noqa: E402
import tiny_data  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model dir with tokenizer.json")
    p.add_argument("--haystack", required=True, help="essay text file or folder of *.txt")
    p.add_argument("--tokens", type=int, required=True, help="ids per context")
    p.add_argument("--count", type=int, required=True, help="contexts")
    p.add_argument("--text-frac", type=float, default=0.25, help="fraction of plain essay passages")
    p.add_argument("--default-haystack-frac", type=float, default=0.2,
                   help="fraction of task prompts on the built-in five-sentence haystack")
    p.add_argument("--seed", type=int, default=20261122)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    tok = bpe_tokenizer.Tokenizer.load(os.path.join(args.model, "tokenizer.json"))
    essays = tiny_data.Haystack.from_path(args.haystack, tok)
    default = tiny_data.Haystack.default(tok)
    rng = random.Random(args.seed)
    contexts, kinds = [], collections.Counter()
    for i in range(args.count):
        if rng.random() < args.text_frac:
            ids = tiny_data.build_text(rng, essays, args.tokens)
            kinds["essay"] += 1
        else:
            task = tiny_data.TASKS[i % len(tiny_data.TASKS)]
            hay = default if rng.random() < args.default_haystack_frac else essays
            s = tiny_data.build_sample(task, rng, hay, args.tokens)
            ids = s.prompt_ids + s.answer_ids + [tok.eos_id]
            if len(ids) > args.tokens:   # the task's own sentences alone overflow a short context
                raise SystemExit("%s does not fit in %d tokens" % (task, args.tokens))
            ids += tiny_data.build_text(rng, essays, args.tokens - len(ids)) if len(ids) < args.tokens else []
            kinds["%s/%s" % (task, hay.name)] += 1
        assert len(ids) == args.tokens, (len(ids), args.tokens)
        contexts.append(ids)
    with open(args.out, "w") as f:
        json.dump(contexts, f)
    print("%d contexts of %d tokens -> %s: %s" % (len(contexts), args.tokens, args.out,
                                                  ", ".join("%s %d" % kv for kv in sorted(kinds.items()))))


if __name__ == "__main__":
    main()
