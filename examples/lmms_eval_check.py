"""Answer a checkpoint's held-out demo records through lmms-eval's ``llava_hf`` model class.

Run in an lmms-eval environment (not the training one; see docs/evaluation.md), e.g.::

    python examples/lmms_eval_check.py output/quickstart --device cpu

It feeds ``DIR/data/eval.json`` (the demo data written beside the quickstart checkpoint, or
``--data``) to ``lmms_eval.models.simple.llava_hf.LlavaHf.generate_until`` as lmms-eval's task
harness would (the question with ``<video>`` prepended by the class, the video path as the visual),
and prints the accuracy and, with ``--compare``, how many answers equal the engine's own
``predictions.jsonl``. Benchmarks on the hub (``--tasks videomme`` ...) are the same class with
lmms-eval's task loader in front.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="checkpoint folder with the HF layout (see `export routes`)")
    parser.add_argument("--data", default=None, help="records (JSON list); default CHECKPOINT/data/eval.json")
    parser.add_argument("--device", default="cpu", help="cpu, cuda:0, ...")
    parser.add_argument("--max-frames", type=int, default=8, help="frames per video (as trained)")
    parser.add_argument("--compare", default=None, help="the engine's predictions.jsonl for the same records")
    args = parser.parse_args()

    from lmms_eval.api.instance import Instance
    from lmms_eval.models.simple.llava_hf import LlavaHf

    data_path = args.data or os.path.join(args.checkpoint, "data", "eval.json")
    with open(data_path, encoding="utf-8") as handle:
        records = json.load(handle)
    folder = os.path.dirname(data_path)
    docs = [{"video": os.path.join(folder, r["video"]),
             "question": r["conversations"][0]["value"].replace("<video>\n", ""),
             "answer": r["conversations"][-1]["value"]} for r in records]
    started = time.perf_counter()
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    model = LlavaHf(pretrained=args.checkpoint, device=args.device, device_map=args.device, dtype=dtype,
                    max_frames_num=args.max_frames)
    model.task_dict = {"local": {"test": docs}}
    requests = [Instance(request_type="generate_until",
                         arguments=(doc["question"], {"max_new_tokens": 16, "until": ["<|im_end|>"]},
                                    lambda d: [d["video"]], index, "local", "test"),
                         idx=0, metadata={"task": "local", "doc_id": index, "repeats": 1})
                for index, doc in enumerate(docs)]
    answers = [answer.strip() for answer in model.generate_until(requests)]
    correct = sum(answer.lower() == doc["answer"].strip().lower() for answer, doc in zip(answers, docs))
    print(f"lmms-eval llava_hf: accuracy {correct}/{len(docs)} = {correct / len(docs):.3f} "
          f"({time.perf_counter() - started:.1f} s)")
    if args.compare:
        with open(args.compare, encoding="utf-8") as handle:
            ours = [json.loads(line)["prediction"].strip() for line in handle]
        same = sum(a == b for a, b in zip(answers, ours))
        print(f"answers equal to the engine's predictions: {same}/{len(answers)}")


if __name__ == "__main__":
    main()
