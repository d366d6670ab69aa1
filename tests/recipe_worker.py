"""`maccap train --recipe ...` in a process of its own, for the recipes' resume and distributed tests.

    python tests/recipe_worker.py TRAIN-ARGS...          (or under `torchrun ... tests/recipe_worker.py TRAIN-ARGS...`)

Environment:
    MACCAP_BATCH_LOG     every training batch appends to BATCH_LOG.<rank> one JSON line: per part (pairs, captions,
                         images) the pixel sums or LM token rows of its rows, and the sum of the projector's weights
                         before the step (flushed and synced, so a SIGKILL loses nothing written)
    MACCAP_KILL_AT_STEP  the process SIGKILLs itself when that optimizer step ends (as tests/train_worker.py does)
"""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from modeling_maccap.tools import recipes  # noqa: E402
from train_worker import run  # noqa: E402  (this folder is on sys.path: it holds the script)


def log_batches(path):
    make = recipes._trainer_class

    def logged_trainer_class():
        trainer_class = make()

        class LoggedTrainer(trainer_class):
            def compute_loss(self, model, inputs, *args, **kwargs):
                if model.training:
                    entry = {}
                    for part, values in inputs.items():
                        if "pixel_values" in values:
                            entry[part] = [round(float(x), 3) for x in values["pixel_values"].flatten(1).sum(1)]
                        if "input_ids" in values:
                            entry[f"{part}_ids"] = values["input_ids"].tolist()
                    projector = self.accelerator.unwrap_model(model).projector
                    entry["projector_sum"] = sum(float(p.double().sum()) for p in projector.parameters())
                    with open(path, "a") as log:
                        log.write(json.dumps(entry) + "\n")
                        log.flush()
                        os.fsync(log.fileno())
                return super().compute_loss(model, inputs, *args, **kwargs)

        return LoggedTrainer

    recipes._trainer_class = logged_trainer_class


if __name__ == "__main__":
    run(log_batches)
