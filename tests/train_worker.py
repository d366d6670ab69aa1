"""`maccap train` in a process of its own, for the resume and distributed tests.

    python tests/train_worker.py TRAIN-ARGS...          (or under `torchrun ... tests/train_worker.py TRAIN-ARGS...`)

Environment:
    MACCAP_BATCH_LOG     every training forward appends its LM token rows to BATCH_LOG.<rank> (one JSON line per
                         batch, flushed and synced before the step goes on, so a SIGKILL loses nothing written)
    MACCAP_KILL_AT_STEP  the process SIGKILLs itself when that optimizer step ends, before anything else runs

With MACCAP_BATCH_LOG, each process last writes BATCH_LOG.<rank>.group: "True" if a torch.distributed process group
is still up after `maccap train` returned, else "False".
"""

import functools
import json
import os
import signal
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import TrainerCallback  # noqa: E402

from modeling_maccap import MacCapForConditionalGeneration  # noqa: E402
from modeling_maccap.tools import training  # noqa: E402
from modeling_maccap.tools.cli import main  # noqa: E402


def log_batches(path):
    forward = MacCapForConditionalGeneration.forward

    @functools.wraps(forward)  # the Trainer reads forward's signature
    def logged_forward(self, input_ids=None, **kwargs):
        if self.training:
            with open(path, "a") as log:
                log.write(json.dumps(input_ids.tolist()) + "\n")
                log.flush()
                os.fsync(log.fileno())
        return forward(self, input_ids=input_ids, **kwargs)

    MacCapForConditionalGeneration.forward = logged_forward


class KillAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_at(step):
    init = training.MacCapTrainer.__init__

    def init_with_kill(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(KillAt(step))

    training.MacCapTrainer.__init__ = init_with_kill


def run(install_batch_log):
    """The worker's entry: the batch log (`install_batch_log(path)`) and the kill step from the environment, then
    `maccap train` on the command line's arguments."""
    log = os.environ.get("MACCAP_BATCH_LOG")
    rank_log = f"{log}.{os.environ.get('RANK', '0')}" if log else None
    if rank_log:
        install_batch_log(rank_log)
    if os.environ.get("MACCAP_KILL_AT_STEP"):
        kill_at(int(os.environ["MACCAP_KILL_AT_STEP"]))
    status = main(sys.argv[1:])
    if rank_log:
        import torch.distributed

        # The distributed tests read this: a finished run leaves no process group up for the interpreter's teardown.
        with open(f"{rank_log}.group", "w") as report:
            report.write(str(torch.distributed.is_initialized()))
    sys.exit(status)


if __name__ == "__main__":
    run(log_batches)
