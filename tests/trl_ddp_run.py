"""A tiny TRL DPO run with the entanglement integration, for the multi-process test.

    python tests/trl_ddp_run.py OUT.json --per-device 4
    accelerate launch --num_processes 2 --cpu tests/trl_ddp_run.py OUT.json --per-device 2

Both give the same global batch (sequential sampling, no shuffling); the main process writes
the logged ``ge/*`` metrics, TRL's own metrics and the per-pair frames to OUT.json.
``--batch-probe K``: the probe is each process's first K pairs of each batch instead.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--per-device", type=int, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-probe", type=int, help="follow k pairs of each batch instead")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from ge_utils.data import sentiment_pairs
    from ge_utils.models import load_model
    from ge_utils.trl_integration import attach_entanglement_metrics

    transformers.logging.set_verbosity_error()
    train, probe = sentiment_pairs(16, 5, config="long")
    data = Dataset.from_list(
        [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in train]
    )
    lm = load_model("tiny-llama", device="cpu")
    ref = load_model("tiny-llama", device="cpu").model
    with tempfile.TemporaryDirectory() as out:
        cfg = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.per_device,
            max_steps=args.steps,
            logging_steps=1,
            learning_rate=1e-3,
            train_sampling_strategy="sequential",
            report_to=[],
            use_cpu=True,
            bf16=False,
            save_strategy="no",
            disable_tqdm=True,
            dataset_num_proc=None,
            seed=0,
        )
        trainer = DPOTrainer(
            model=lm.model,
            ref_model=ref,
            args=cfg,
            train_dataset=data,
            processing_class=lm.tokenizer,
        )
        callback = attach_entanglement_metrics(trainer, probe=args.batch_probe or probe)
        trainer.train()
    if trainer.accelerator.is_main_process:
        logs = [h for h in trainer.state.log_history if "ge/inner" in h]
        result = {
            "world": trainer.accelerator.num_processes,
            "logs": logs,
            "pairs": callback.pairs_frame().drop(columns="rank").to_dict("list"),
            "probe": callback.probe_frame().to_dict("list"),
        }
        with open(args.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
