"""The per-step log of a stage: one JSON line per step in <out>/<stage>.log.jsonl, written by rank 0 alone."""
import json
from pathlib import Path

from support import distributed
from support.files import atomic_write


class StepLog:
    """Rows are flushed as they come, so a killed run keeps every step it logged. On --resume the log continues
    from the resumed step: rows the killed run wrote after its last resume state are dropped, since the resumed run
    computes those steps again, so no step appears twice."""

    def __init__(self, path, resume_step=None, key="step"):
        self.file = None
        if not distributed.is_main():
            return
        path = Path(path)
        kept = []
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)[key] <= resume_step]
        atomic_write(path, "".join(line + "\n" for line in kept))
        self.file = open(path, "a")

    def write(self, row):
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()
