"""Prompt sets: local files, folders saved by `datasets`, hub datasets, built-in demo sets.

Sources (``PromptSetSpec.dataset``):
- ``builtin:NAME``: the file ``heretic_dist/data/NAME.txt`` shipped with the package;
- a local file: ``.txt`` (one prompt per line, blank lines skipped, lines stripped; any other unknown
  extension is read the same way, like upstream), ``.jsonl``, ``.json`` (a list of objects or strings),
  ``.csv``, ``.parquet``;
- a local folder saved by ``datasets.save_to_disk`` (Dataset or DatasetDict), or any folder that
  ``datasets.load_dataset`` understands;
- otherwise a Hugging Face hub id, read with ``datasets.load_dataset`` (needs the package and a network).

Split syntax (like `datasets` and upstream Heretic): ``NAME[START:END]`` with optional, possibly negative
or percent bounds: ``train[:400]``, ``test[:100]``, ``[100:200]``, ``[-50:]``, ``train[:10%]``. For single
local files the name part is ignored; only the slice applies.

Prefix and suffix follow upstream: ``f"{prefix} {text}"`` and ``f"{text} {suffix}"`` when non-empty.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heretic_dist.config import PromptSetSpec
from heretic_dist.engine.types import Prompt
from heretic_dist.errors import UserError

BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).resolve().parent / "data"
TABULAR_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
DEFAULT_COLUMN = "text"

_SPLIT_RE = re.compile(
    r"""^\s*
    (?P<name>[\w.\-]*)\s*
    (?:\[\s*
        (?P<start>[+-]?[\d_]+)?\s*(?P<start_pct>%)?\s*
        :\s*
        (?P<end>[+-]?[\d_]+)?\s*(?P<end_pct>%)?\s*
    \])?
    \s*$""",
    re.X,
)


@dataclass(frozen=True)
class Split:
    """A parsed split spec: optional split name and a slice (None bounds = open ends)."""

    name: str | None
    start: int | None
    end: int | None
    percent: bool = False

    def bounds(self, n: int) -> tuple[int, int]:
        """Absolute [start, end) for a sequence of length n (clamped like `datasets` does)."""

        def conv(v: int | None, default: int) -> int:
            if v is None:
                return default
            if self.percent:
                v = int(round(v * n / 100.0))
            if v < 0:
                v = max(n + v, 0)
            return min(v, n)

        return conv(self.start, 0), conv(self.end, n)

    def apply(self, items: list) -> list:
        start, end = self.bounds(len(items))
        return items[start:end]

    @property
    def is_full(self) -> bool:
        return self.start is None and self.end is None


def parse_split(split: str | None, where: str = "") -> Split:
    """Parse ``train[:400]``, ``[100:200]``, ``test``, ``[-5:]``, ``train[10%:20%]``; None = everything."""
    if split is None:
        return Split(None, None, None)
    m = _SPLIT_RE.match(split)
    if m is None:
        at = f" for {where}" if where else ""
        raise UserError(
            f"bad split '{split}'{at}: expected NAME[START:END] with integer bounds, "
            "e.g. \"train[:400]\", \"[100:200]\" or \"test\""
        )

    def num(s: str | None) -> int | None:
        return None if s is None else int(s.replace("_", ""))

    return Split(
        name=m.group("name") or None,
        start=num(m.group("start")),
        end=num(m.group("end")),
        percent=bool(m.group("start_pct") or m.group("end_pct")),
    )


# ----------------------------------------------------------------------------------------------------


def load_prompt_set(
    spec: PromptSetSpec, default_system_prompt: str, *, label: str | None = None
) -> list[Prompt]:
    """Load, slice and wrap one prompt set. `label` (e.g. "bad_prompts") only improves messages."""
    ds = spec.dataset
    where = f"{label} ({ds})" if label else ds
    split = parse_split(spec.split, where)

    if ds.startswith(BUILTIN_PREFIX):
        texts = _read_local_file(_builtin_path(ds, where), spec, split, where)
    else:
        path = Path(ds).expanduser()
        if path.is_file():
            texts = _read_local_file(path, spec, split, where)
        elif path.is_dir():
            texts = _read_local_folder(path, spec, split, where)
        elif _looks_like_path(ds):
            raise UserError(f"prompt file not found: {where}")
        else:
            texts = _read_hub(ds, spec, split, where)

    if not texts:
        sliced = f" after split '{spec.split}'" if spec.split is not None and not split.is_full else ""
        raise UserError(f"no prompts in {where}{sliced}")

    if spec.prefix:
        texts = [f"{spec.prefix} {t}" for t in texts]
    if spec.suffix:
        texts = [f"{t} {spec.suffix}" for t in texts]
    system = default_system_prompt if spec.system_prompt is None else spec.system_prompt
    return [Prompt(system=system, user=t) for t in texts]


def prompt_set_hash(prompts: list[Prompt]) -> str:
    """sha256 hex of a canonical JSON list of [system, user] pairs (order matters)."""
    canonical = json.dumps(
        [[p.system, p.user] for p in prompts], ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def builtin_names() -> list[str]:
    if not BUILTIN_DIR.is_dir():
        return []
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.txt"))


def _builtin_path(ds: str, where: str) -> Path:
    name = ds[len(BUILTIN_PREFIX) :]
    path = BUILTIN_DIR / f"{name}.txt"
    if not name or "/" in name or "\\" in name or not path.is_file():
        available = ", ".join(f"builtin:{n}" for n in builtin_names()) or "none"
        raise UserError(f"unknown built-in prompt set {where} (available: {available})")
    return path


def _looks_like_path(ds: str) -> bool:
    """True when a missing dataset string is clearly meant as a local path, not a hub id."""
    if ds.startswith(("/", "./", "../", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", ds):
        return True
    if Path(ds).suffix.lower() in (".txt",) + TABULAR_SUFFIXES:
        return True
    # Hub ids are "name" or "owner/name" with a restricted alphabet.
    return not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", ds)


# ----------------------------------------------------------------------------------------------------
# Local files


def _decode(path: Path, where: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {where}: {e.strerror or e}") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(
            f"{where} is not valid UTF-8: bad byte 0x{data[e.start]:02x} at line {line} "
            f"(byte offset {e.start}); the file must be UTF-8 text"
        ) from None


def _lines(text: str) -> list[str]:
    """Split like Python's universal newlines (\\n, \\r\\n, \\r), not str.splitlines()."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _read_local_file(path: Path, spec: PromptSetSpec, split: Split, where: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, spec, split, where)
    if suffix not in TABULAR_SUFFIXES:  # .txt and anything else: one prompt per line
        texts = [line.strip() for line in _lines(_decode(path, where))]
        return split.apply([t for t in texts if t])

    text = _decode(path, where)
    column = spec.column or DEFAULT_COLUMN
    rows: list[tuple[str, Any]]  # (position for messages, row)
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(_lines(text), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON at line {i}: {e.msg}") from None
    elif suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if isinstance(doc, dict) and isinstance(doc.get(column), list):
            doc = doc[column]  # {"text": [...]} form
            rows = [(f"item {i}", v) for i, v in enumerate(doc)]
            return _check_strings(split.apply(rows), column, where)
        if not isinstance(doc, list):
            raise UserError(
                f"{where}: expected a JSON list of objects or strings, found a {_kind(doc)}"
            )
        rows = [(f"item {i}", v) for i, v in enumerate(doc)]
    else:  # .csv
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = next(reader)
        except StopIteration:
            raise UserError(f"no prompts in {where} (the CSV file is empty)") from None
        except csv.Error as e:
            raise UserError(f"{where}: invalid CSV at line 1: {e}") from None
        if column not in header:
            raise UserError(
                f"{where}: no column '{column}' (available: {', '.join(header) or 'none'}); set 'column'"
            )
        idx = header.index(column)
        texts = []
        try:
            for rec in reader:
                if not rec:
                    continue
                if idx >= len(rec):
                    raise UserError(f"{where}: line {reader.line_num} has no value for column '{column}'")
                texts.append(rec[idx])
        except csv.Error as e:
            raise UserError(f"{where}: invalid CSV at line {reader.line_num}: {e}") from None
        return split.apply(texts)

    return _pick_column(split.apply(rows), spec.column, where)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "list",
        dict: "object",
    }.get(type(value), type(value).__name__)


def _pick_column(rows: list[tuple[str, Any]], column: str | None, where: str) -> list[str]:
    """Rows are objects (take `column`, default "text") or plain strings (when no column is set)."""
    col = column or DEFAULT_COLUMN
    out = []
    for pos, row in rows:
        if isinstance(row, str) and column is None:
            out.append(row)
        elif isinstance(row, dict):
            if col not in row:
                available = ", ".join(map(str, row)) or "none"
                raise UserError(f"{where}: {pos} has no column '{col}' (available: {available}); set 'column'")
            value = row[col]
            if not isinstance(value, str):
                raise UserError(f"{where}: {pos}: column '{col}' holds a {_kind(value)}, not a string")
            out.append(value)
        else:
            raise UserError(
                f"{where}: {pos} is a {_kind(row)}; expected an object with a '{col}' string"
                + (" or a string" if column is None else "")
            )
    return out


def _check_strings(rows: list[tuple[str, Any]], column: str, where: str) -> list[str]:
    out = []
    for pos, value in rows:
        if not isinstance(value, str):
            raise UserError(f"{where}: {pos} of column '{column}' is a {_kind(value)}, not a string")
        out.append(value)
    return out


def _read_parquet(path: Path, spec: PromptSetSpec, split: Split, where: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{where}: not a readable Parquet file ({_first_line(e)})") from None
    column = spec.column or DEFAULT_COLUMN
    if column not in schema.names:
        raise UserError(
            f"{where}: no column '{column}' (available: {', '.join(schema.names) or 'none'}); set 'column'"
        )
    col_type = schema.field(column).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise UserError(f"{where}: column '{column}' has type {col_type}, not string")
    values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    rows = split.apply([(f"row {i}", v) for i, v in enumerate(values)])
    return _check_strings(rows, column, where)


# ----------------------------------------------------------------------------------------------------
# Folders and the hub (through `datasets`)


def _import_datasets(where: str, why: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"{where}: {why} needs the `datasets` package, which is not installed; "
            "install it, or use a local .txt/.jsonl/.json/.csv/.parquet file"
        ) from None
    return datasets


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _read_local_folder(path: Path, spec: PromptSetSpec, split: Split, where: str) -> list[str]:
    saved = (path / "dataset_info.json").is_file() or (path / "state.json").is_file()
    saved_dict = (path / "dataset_dict.json").is_file()
    datasets = _import_datasets(where, "a prompt folder")
    try:
        if saved or saved_dict:
            obj = datasets.load_from_disk(str(path))
        else:
            obj = datasets.load_dataset(
                str(path), verification_mode="no_checks", download_mode="force_redownload"
            )
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure inside `datasets` becomes one line
        raise UserError(f"{where}: cannot read the dataset folder ({_first_line(e)})") from None
    return _from_dataset(obj, spec, split, where)


def _read_hub(ds: str, spec: PromptSetSpec, split: Split, where: str) -> list[str]:
    datasets = _import_datasets(where, "a Hugging Face hub dataset (no local file or folder of that name)")
    if split.name is None:
        raise UserError(
            f"{where}: a hub dataset needs a split name, e.g. split = \"train[:400]\""
        )
    try:
        obj = datasets.load_dataset(ds, split=split.name, revision=spec.commit)
    except Exception as e:  # noqa: BLE001
        raise UserError(
            f"could not load {where} from the Hugging Face hub ({_first_line(e)}); "
            "if you are offline, point 'dataset' at a local file (.txt, .jsonl, .csv, .parquet)"
        ) from None
    return _from_dataset(obj, spec, split, where)


def _from_dataset(obj: Any, spec: PromptSetSpec, split: Split, where: str) -> list[str]:
    if _is_dataset_dict(obj):
        names = list(obj.keys())
        if split.name is not None:
            if split.name not in obj:
                raise UserError(f"{where}: no split '{split.name}' (available: {', '.join(names)})")
            obj = obj[split.name]
        elif len(names) == 1:
            obj = obj[names[0]]
        else:
            raise UserError(
                f"{where}: the dataset has several splits ({', '.join(names)}); name one, e.g. "
                f"split = \"{names[0]}[:400]\""
            )
    column = spec.column or DEFAULT_COLUMN
    columns = list(getattr(obj, "column_names", []) or [])
    if column not in columns:
        raise UserError(f"{where}: no column '{column}' (available: {', '.join(columns) or 'none'}); set 'column'")
    start, end = split.bounds(len(obj))
    values = obj[start:end][column] if end > start else []
    return _check_strings([(f"row {start + i}", v) for i, v in enumerate(values)], column, where)


def _is_dataset_dict(obj: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, (datasets.DatasetDict, getattr(datasets, "IterableDatasetDict", ())))
