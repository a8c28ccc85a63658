"""Corpus inputs as they are shipped: which files, which format, which chunks, which records.

`list_inputs(path)`: `data.path` is a file, a directory (every file under it, sorted,
hidden ones skipped, each real file once) or a glob (``corpus/*.jsonl.gz``).

Formats, by file name (after a ``.gz`` or ``.zst``/``.zstd`` compression suffix):
  ``.jsonl``/``.ndjson``  one JSON object a line, its text under `data.text_key`
  ``.parquet``            a Parquet file with a text column `data.text_key` (pyarrow,
                          read one row group at a time)
  ``.arrow``/``.feather`` an Arrow IPC file with that column (one record batch at a time)
  ``.npy``                a 1-D array of unsigned token ids, documents separated by the
                          tokenizer's end-of-text id (`data.tokenizer` names the tokenizer)
  ``.bin``                raw token ids with a JSON sidecar ``<file>.bin.json`` naming
                          their dtype (``{"dtype": "uint16"}``), separated the same way
  anything else           plain UTF-8 text, cut into documents at `data.doc_separator`
Parquet, Arrow and zstd need the ``data`` extra (``pip install 'lmmask[data]'``).

Chunks (`plan`) are the unit of work and of resumption: a large file is cut into byte
ranges of about `data.chunk_bytes`, each ending just after a record separator (a newline
for JSONL, `data.doc_separator` for text, an end-of-text id for tokens), so one 50 GB
JSONL never restarts from zero; a compressed file likewise, in ranges of its decompressed
bytes (found by one streaming pass; `chunk_data` streams them to the workers, since a
compressed stream cannot be entered in the middle); Parquet and Arrow files are cut at
row groups / record batches. The plan depends only on the files and the settings, so it
is the same on every rerun and for any number of workers.

`read_chunk` yields each record of a chunk as ``(text, None)``, ``(token_ids, None)`` or,
for a record that cannot be read, ``(None, "file:line N: what is wrong")``.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import zlib

import numpy as np

EXTRA_HINT = "pip install 'lmmask[data]' (or: pip install {pkg})"
COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
TABLES = {".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow"}
SIDECAR = ".json"            # <file>.bin.json names the dtype of <file>.bin
NEWLINE = b"\n"
SCAN = 1 << 20               # bytes read at a time when looking for a chunk boundary


def _module(name: str, pkg: str):
  """An optional dependency, or an ImportError saying which extra to install."""
  try:
    return __import__(name, fromlist=["_"])
  except ImportError:
    raise ImportError(f"reading this corpus needs {pkg}: {EXTRA_HINT.format(pkg=pkg)}") from None


@dataclasses.dataclass(frozen=True)
class Input:
  path: str
  fmt: str            # text | jsonl | parquet | arrow | npy | bin
  compression: str    # "" | gzip | zstd


def describe(path: str) -> Input:
  name = os.path.basename(path).lower()
  root, ext = os.path.splitext(name)
  compression = COMPRESSED.get(ext, "")
  if compression:
    root, ext = os.path.splitext(root)
  if ext in (".jsonl", ".ndjson"):
    fmt = "jsonl"
  elif ext in TABLES:
    fmt = TABLES[ext]
  elif ext in (".npy", ".bin"):
    fmt = ext[1:]
  else:
    fmt = "text"
  if compression and fmt in ("parquet", "arrow", "npy", "bin"):
    raise ValueError(f"{path}: a compressed {fmt} file is not supported; decompress it "
                     f"(Parquet and Arrow compress inside the file)")
  return Input(path, fmt, compression)


def list_inputs(path: str) -> list[Input]:
  """The input files of `data.path` (a file, a directory or a glob), sorted."""
  path = os.path.expanduser(path)
  if not path:
    raise ValueError("config.data.path is empty; set it to a corpus file, directory or glob")
  if any(c in path for c in "*?["):
    found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    if not found:
      raise ValueError(f"config.data.path={path!r} matches no file")
    candidates = found
  elif os.path.isfile(path):
    candidates = [path]
  elif os.path.isdir(path):
    candidates = []
    for root, dirs, files in os.walk(path, followlinks=False):
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      candidates += [os.path.join(root, n) for n in sorted(files) if not n.startswith(".")]
  else:
    raise ValueError(f"config.data.path={path!r} is neither a file, a directory nor a glob")
  out, seen = [], set()
  names = set(candidates)
  for p in candidates:
    real = os.path.realpath(p)
    if real in seen or not os.path.isfile(real):
      continue
    if p.endswith(".bin" + SIDECAR) and p[:-len(SIDECAR)] in names:
      continue  # a .bin file's sidecar, read with it
    seen.add(real)
    out.append(describe(p))
  if not out:
    raise ValueError(f"no files under {path!r}")
  return out


# ---------------------------------------------------------------------------
# Chunks.

@dataclasses.dataclass(frozen=True)
class Chunk:
  file: int           # index into the input list
  start: int          # bytes (text, jsonl; decompressed when compressed), tokens (npy, bin),
                      # row groups / batches (tables)
  end: int            # exclusive; -1 = to the end of the file; BROKEN = unreadable from start


BROKEN = -2


def _read_error(e: BaseException) -> bool:
  """Whether `e` says that a (compressed) file cannot be read, rather than a bug."""
  return isinstance(e, (OSError, EOFError, zlib.error)) or \
      type(e).__module__.startswith("zstandard")


def _pieces(inp: Input, sep: bytes, step: int):
  """(start, end, bytes, first line) of a compressed file's decompressed bytes in pieces
  that end just after the first `sep` at or past `step` bytes (the cut of `plan` for plain
  files); (start, BROKEN, message, line) where the stream cannot be read further."""
  pos, line, buf = 0, 1, bytearray()
  try:
    with _open_stream(inp) as f:
      while True:
        block = f.read(4 * SCAN)
        buf += block
        while sep and len(buf) > step:
          i = buf.find(sep, step)
          if i < 0:
            break
          piece = bytes(buf[:i + len(sep)])
          del buf[:i + len(sep)]
          yield pos, pos + len(piece), piece, line
          pos, line = pos + len(piece), line + piece.count(NEWLINE)
        if not block:
          break
  except Exception as e:  # noqa: BLE001 (zstandard's error type is its own)
    if not _read_error(e):
      raise
    yield pos, BROKEN, f"{inp.path}: cannot be read as {inp.compression} ({e})", line
    return
  if buf or pos == 0:
    yield pos, pos + len(buf), bytes(buf), line


def chunk_data(files: list[Input], chunks: list[Chunk], ks, d):
  """For each chunk index in `ks` (ascending): None for a chunk its worker reads itself,
  or (bytes, first line) of a compressed file's chunk, streamed here once in order."""
  cur = None
  for k in ks:
    c = chunks[k]
    inp = files[c.file]
    if not inp.compression:
      yield None
      continue
    if cur is None or cur[0] != c.file:
      cur = (c.file, _pieces(inp, _separator(inp, d), int(d.chunk_bytes)))
    for start, _, data, line in cur[1]:
      if start == c.start:
        yield data, line
        break


def _separator(inp: Input, d) -> bytes:
  return b"\n" if inp.fmt == "jsonl" else d.doc_separator.encode("utf-8")


def _next_boundary(f, pos: int, sep: bytes, size: int) -> int:
  """The offset just after the first `sep` at or after `pos` (size if none)."""
  carry = b""
  f.seek(pos)
  base = pos
  while base < size:
    block = f.read(SCAN)
    if not block:
      break
    buf = carry + block
    i = buf.find(sep)
    if i >= 0:
      return base - len(carry) + i + len(sep)
    keep = len(sep) - 1
    carry = buf[-keep:] if keep else b""
    base += len(block)
  return size


def _token_layout(inp: Input):
  """(dtype, offset of the first id, number of ids) of an .npy or .bin token file."""
  if inp.fmt == "npy":
    try:
      arr = np.load(inp.path, mmap_mode="r")
    except ValueError as e:
      raise ValueError(f"{inp.path}: not a readable .npy file ({e})") from None
    shape, dtype, offset = arr.shape, arr.dtype, getattr(arr, "offset", 0)
    if len(shape) != 1 or dtype.kind != "u":
      raise ValueError(f"{inp.path}: token ids must be a 1-D array of unsigned integers, got "
                       f"shape {shape} dtype {dtype}")
    return dtype, offset, int(shape[0])
  side = inp.path + SIDECAR
  if not os.path.exists(side):
    raise ValueError(f"{inp.path}: a raw .bin token file needs a JSON sidecar {side} naming "
                     f"its dtype, e.g. {{\"dtype\": \"uint16\"}}")
  with open(side) as f:
    meta = json.load(f)
  try:
    dtype = np.dtype(meta["dtype"])
  except (TypeError, KeyError):
    dtype = None
  if dtype is None or dtype.kind != "u":
    raise ValueError(f"{side}: \"dtype\" must name an unsigned integer type (uint16, uint32)")
  size = os.path.getsize(inp.path)
  if size % dtype.itemsize:
    raise ValueError(f"{inp.path}: {size} bytes is not a whole number of {dtype} ids")
  return dtype.newbyteorder("<"), 0, size // dtype.itemsize


def plan(files: list[Input], d, eos_id: int | None = None) -> list[Chunk]:
  """The chunks of every file, in file order (see the module docstring)."""
  out = []
  step = int(d.chunk_bytes)
  for i, inp in enumerate(files):
    if inp.compression:
      out += [Chunk(i, a, b) for a, b, _, _ in _pieces(inp, _separator(inp, d), step)]
    elif inp.fmt == "text" and not d.doc_separator:
      out.append(Chunk(i, 0, -1))
    elif inp.fmt in ("text", "jsonl"):
      size = os.path.getsize(inp.path)
      sep, start = _separator(inp, d), 0
      with open(inp.path, "rb") as f:
        while start < size:
          end = size if start + step >= size else _next_boundary(f, start + step, sep, size)
          out.append(Chunk(i, start, end))
          start = end
      if size == 0:
        out.append(Chunk(i, 0, 0))
    elif inp.fmt in ("npy", "bin"):
      dtype, offset, n = _token_layout(inp)
      per = max(1, step // dtype.itemsize)
      ids = np.memmap(inp.path, dtype=dtype, mode="r", offset=offset, shape=(n,)) if n else None
      start = 0
      while start < n:
        end = n
        if start + per < n:
          j = start + per
          while j < n:  # the next end-of-text id at or after j
            block = np.asarray(ids[j:j + SCAN])
            hit = np.flatnonzero(block == eos_id)
            if hit.size:
              end = j + int(hit[0]) + 1
              break
            j += SCAN
        out.append(Chunk(i, start, end))
        start = end
      if n == 0:
        out.append(Chunk(i, 0, 0))
    else:
      sizes = _table_parts(inp)
      start, acc = 0, 0
      for j, s in enumerate(sizes):
        acc += s
        if acc >= step or j == len(sizes) - 1:
          out.append(Chunk(i, start, j + 1))
          start, acc = j + 1, 0
      if not sizes:
        out.append(Chunk(i, 0, 0))
  return out


def _table_parts(inp: Input) -> list[int]:
  """Byte sizes of a table file's row groups (Parquet) or record batches (Arrow)."""
  pa = _module("pyarrow", "pyarrow")
  try:
    if inp.fmt == "parquet":
      pq = _module("pyarrow.parquet", "pyarrow")
      md = pq.ParquetFile(inp.path).metadata
      return [md.row_group(j).total_byte_size for j in range(md.num_row_groups)]
    with pa.memory_map(inp.path) as src:
      r = pa.ipc.open_file(src)
      return [r.get_batch(j).nbytes for j in range(r.num_record_batches)]
  except (pa.ArrowInvalid, OSError) as e:
    raise ValueError(f"{inp.path}: not a readable {inp.fmt} file ({e})") from None


def chunk_bytes(files: list[Input], chunk: Chunk) -> int:
  """About how many input bytes a chunk covers (for progress)."""
  if chunk.end >= 0 and files[chunk.file].fmt in ("text", "jsonl"):  # decompressed bytes
    return chunk.end - chunk.start
  if chunk.start == 0 and chunk.end < 0:
    return os.path.getsize(files[chunk.file].path)
  return 0


# ---------------------------------------------------------------------------
# Records.

def _line_of(path: str, offset: int) -> int:
  """1-based line number of byte `offset` of an uncompressed file (only on an error)."""
  n, done = 1, 0
  with open(path, "rb") as f:
    while done < offset:
      block = f.read(min(SCAN, offset - done))
      if not block:
        break
      n += block.count(b"\n")
      done += len(block)
  return n


def _open_stream(inp: Input):
  if inp.compression == "gzip":
    return gzip.open(inp.path, "rb")
  if inp.compression == "zstd":
    zstd = _module("zstandard", "zstandard")
    return zstd.ZstdDecompressor().stream_reader(open(inp.path, "rb"), closefd=True)
  return open(inp.path, "rb")


def _raw(inp: Input, chunk: Chunk) -> bytes:
  """The bytes of an uncompressed text or JSONL chunk."""
  with open(inp.path, "rb") as f:
    f.seek(chunk.start)
    return f.read((chunk.end if chunk.end >= 0 else os.path.getsize(inp.path)) - chunk.start)


def _where(inp: Input, chunk: Chunk, raw: bytes, at: int, line: int | None) -> str:
  """'file:line N' for byte `at` of the chunk's bytes (`line`: the chunk's first line,
  given for a compressed file's chunk)."""
  if line is not None:
    return f"{inp.path}:{line + raw.count(NEWLINE, 0, at)}"
  return f"{inp.path}:{_line_of(inp.path, chunk.start + at)}"


def read_chunk(inp: Input, chunk: Chunk, d, eos_id: int | None = None, data=None):
  """Yield (record, None) or (None, error message) for every record of `chunk`; `data`
  is what `chunk_data` gave for it."""
  if data is not None:
    yield from _read_lines(inp, chunk, d, data)
    return
  if chunk.end == chunk.start == 0 and inp.fmt not in ("parquet", "arrow"):
    if os.path.getsize(inp.path) == 0:
      yield None, f"{inp.path}: empty file (no documents); remove it or fill it"
      return
  if inp.fmt in ("text", "jsonl"):
    yield from _read_lines(inp, chunk, d)
  elif inp.fmt in ("npy", "bin"):
    yield from _read_tokens(inp, chunk, eos_id)
  else:
    yield from _read_table(inp, chunk, d)


def _read_lines(inp: Input, chunk: Chunk, d, data=None):
  if chunk.end == BROKEN:
    yield None, data[0]
    return
  try:
    raw, line = (_raw(inp, chunk), None) if data is None else data
  except OSError as e:
    yield None, f"{inp.path}: cannot be read ({e})"
    return
  if not raw.strip():
    if chunk.start == 0:
      yield None, f"{inp.path}: empty file (no documents); remove it or fill it"
    return
  sep = _separator(inp, d)
  pos = 0
  parts = raw.split(sep) if sep else [raw]
  for part in parts:
    at, pos = pos, pos + len(part) + len(sep)
    if not part.strip():
      continue
    try:
      s = part.decode("utf-8")
    except UnicodeDecodeError as e:
      yield None, (f"{_where(inp, chunk, raw, at + e.start, line)}: not UTF-8 (byte "
                   f"0x{part[e.start]:02x}); convert the file to UTF-8")
      continue
    if inp.fmt == "text":
      s = s.strip()
      if s:
        yield s, None
      continue
    try:
      obj = json.loads(s)
    except json.JSONDecodeError as e:
      yield None, f"{_where(inp, chunk, raw, at, line)}: not valid JSON ({e.msg})"
      continue
    key = d.text_key
    if not isinstance(obj, dict) or key not in obj:
      keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
      yield None, (f"{_where(inp, chunk, raw, at, line)}: no {key!r} field (data.text_key="
                   f"{key!r}; the record has {keys})")
      continue
    if not isinstance(obj[key], str):
      yield None, (f"{_where(inp, chunk, raw, at, line)}: field {key!r} is "
                   f"{type(obj[key]).__name__}, not a string")
      continue
    text = obj[key].strip()
    if text:
      yield text, None


def _read_table(inp: Input, chunk: Chunk, d):
  pa = _module("pyarrow", "pyarrow")
  key = d.text_key
  try:
    if inp.fmt == "parquet":
      pq = _module("pyarrow.parquet", "pyarrow")
      pf = pq.ParquetFile(inp.path)
      names = pf.schema_arrow.names

      def part(j):
        return pf.read_row_group(j, columns=[key])
      label = "row group"
    else:
      src = pa.memory_map(inp.path)
      r = pa.ipc.open_file(src)
      names = r.schema.names

      def part(j):
        return r.get_batch(j)
      label = "record batch"
    parts = range(chunk.start, chunk.end)
    if key not in names:
      yield None, f"{inp.path}: no column {key!r} (data.text_key); columns: {names}"
      return
  except (pa.ArrowInvalid, OSError) as e:
    yield None, f"{inp.path}: not a readable {inp.fmt} file ({e})"
    return
  for j in parts:
    try:
      col = part(j).column(key)
      if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        yield None, (f"{inp.path}: column {key!r} is {col.type}, not text (data.text_key "
                     f"names the column of documents)")
        return
      values = col.to_pylist()
    except (pa.ArrowInvalid, OSError) as e:
      yield None, f"{inp.path}: {label} {j}: column {key!r} cannot be read ({e})"
      continue
    for k, v in enumerate(values):
      if v is None:
        yield None, f"{inp.path}: {label} {j} row {k}: {key!r} is null"
        continue
      v = v.strip()
      if v:
        yield v, None


def _read_tokens(inp: Input, chunk: Chunk, eos_id: int):
  dtype, offset, n = _token_layout(inp)
  end = n if chunk.end < 0 else chunk.end
  ids = np.fromfile(inp.path, dtype=dtype, count=end - chunk.start,
                    offset=offset + chunk.start * dtype.itemsize).astype(np.int64)
  cuts = np.flatnonzero(ids == eos_id)
  start = 0
  for c in [*cuts.tolist(), len(ids)]:
    if c > start:
      yield ids[start:c], None
    start = c + 1

