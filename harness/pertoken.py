"""Per-token output (``output.save_tokens``): every scored token's NLL to ``tokens.parquet``.

Columns: ``document`` (the stream's document or sample index), ``position`` (the token's index
in its stream), ``token_id``, ``token`` (its text, ``convert_ids_to_tokens``) and ``nll`` (nats,
float32 as scored). Rows come in scoring order (batches sorted by length); sort by document and
position to read a text. The writer is fed by the scoring loop's ``on_batch`` callback and
writes each batch as a Parquet row group (pyarrow's ``ParquetWriter``), so memory stays bounded
on a long corpus. It writes to a temporary file in the run folder, renamed into place only when
the run finishes; a failed run leaves nothing behind (a killed one leaves a hidden temporary
file, removed when the run is resumed).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TOKENS = "tokens.parquet"
SCHEMA = pa.schema([("document", pa.int64()), ("position", pa.int64()), ("token_id", pa.int64()),
                    ("token", pa.string()), ("nll", pa.float32())])


class TokenWriter:
    def __init__(self, folder: Path, streams, tokenizer, finished=()):
        """``finished``: windows already scored (taken over from a resumed run), written first."""
        self.folder, self.streams, self.tok = Path(folder), streams, tokenizer
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(f".{TOKENS}.*.tmp"):  # left by a killed run of this folder
            with contextlib.suppress(OSError):
                stale.unlink()
        fd, self.tmp = tempfile.mkstemp(prefix=f".{TOKENS}.", suffix=".tmp", dir=self.folder)
        os.close(fd)
        self.writer = pq.ParquetWriter(self.tmp, SCHEMA)
        self.rows = 0
        self.append(finished)

    def append(self, finished) -> None:
        """Write the scored tokens of some finished windows (``resume.Finished``) as one row group."""
        docs, pos, ids, nlls = [], [], [], []
        for f in finished:
            r = f.record
            s = self.streams[r.doc]
            p = np.arange(r.score_begin, r.score_end)
            docs.append(np.full(len(p), s.doc))
            pos.append(p)
            ids.append(np.asarray(s.ids[r.score_begin : r.score_end], dtype=np.int64))
            nlls.append(np.asarray(f.nlls, dtype=np.float32))
        if not docs:
            return
        ids_all = np.concatenate(ids)
        text = self.tok.convert_ids_to_tokens(ids_all.tolist())
        self.writer.write_table(pa.table([np.concatenate(docs), np.concatenate(pos), ids_all, text, np.concatenate(nlls)], schema=SCHEMA))
        self.rows += len(ids_all)

    def close(self, keep: bool) -> Path | None:
        """Put ``tokens.parquet`` in place (``keep``), or remove the partial file (a failed run)."""
        if not keep:
            self.abort()
            return None
        self.writer.close()
        path = self.folder / TOKENS
        os.replace(self.tmp, path)
        return path

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)
