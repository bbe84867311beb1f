"""The per-step log of a stage: one JSON line per step in <out>/<stage>.log.jsonl, written by rank 0 alone."""
import json
from pathlib import Path

from support import distributed
from support.files import atomic_write


class StepLog:
    """Rows are flushed as they come, so a killed run keeps every step it logged. On --resume the log continues
    from the resumed step: rows the killed run wrote after its last resume state are dropped, since the resumed run
    computes those steps again, so no step appears twice; so is a last line torn by the kill (see _rows)."""

    def __init__(self, path, resume_step=None, key="step"):
        self.file = None
        if not distributed.is_main():
            return
        path = Path(path)
        kept = []
        if resume_step is not None and path.exists():
            kept = [line for line, row in _rows(path, key) if row[key] <= resume_step]
        atomic_write(path, "".join(line + "\n" for line in kept))
        self.file = open(path, "a")

    def write(self, row):
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


def _rows(path, key):
    """(line, row) for each line of a step log. A last line that is no JSON is a row torn by a kill mid-write (a
    cut JSON object never parses): it is dropped, saying so, as the resumed run logs that step again. Any other bad
    line is a ValueError naming the file and line."""
    lines = path.read_bytes().split(b"\n")
    if not lines[-1]:
        lines.pop()  # the newline that ends the last row
    out = []
    for lineno, raw in enumerate(lines, 1):
        text = raw.decode("utf-8", errors="replace")
        try:
            row = json.loads(text)
        except ValueError as e:
            if lineno == len(lines):
                print(f"{path}: dropped its torn last line {text[:60]!r} (a run killed while writing it); the resumed "
                      f"run logs that step again")
                break
            why = f"not JSON ({e})"
        else:
            if isinstance(row, dict) and isinstance(row.get(key), int) and not isinstance(row[key], bool):
                out.append((text, row))
                continue
            why = f"no {key!r} number"
        raise ValueError(f"{path}:{lineno}: a damaged step-log row ({why}): repair or delete the line, or start anew "
                         f"without --resume")
    return out
