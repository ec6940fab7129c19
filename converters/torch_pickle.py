"""Reads PyTorch checkpoint files without importing torch or running code from them.

`torch.save` writes Python pickles, and unpickling an untrusted pickle with the standard
library calls whatever the file names (`os.system`, `eval`, ...). `load` reads both
layouts torch has written and returns the saved object with every tensor turned into a
C-contiguous numpy copy of its true dtype (bfloat16/float8 via `ml_dtypes`); the device
a tensor was saved from is ignored.

* Zip layout (torch >= 1.6): `<archive>/data.pkl`, one raw member `<archive>/data/<key>`
  per storage, and `<archive>/byteorder` (little if absent).
* Legacy layout (torch <= 1.5, or `_use_new_zipfile_serialization=False`): pickles of the
  magic number, protocol version 1001 and sys info, the object pickle, a pickled list of
  storage keys, then per key an 8-byte little-endian element count and the raw
  little-endian bytes. The pre-0.4 tar layout is refused.

Safety model: `find_class` never imports anything. (1) An explicit allow-list (tensor
rebuild functions, storage classes, torch dtypes, `OrderedDict`, numpy array/dtype/scalar
reconstruction for plain numeric dtypes, `_codecs.encode`, set/frozenset/complex/slice)
maps to this module's own implementations, which check their arguments. (2) Globals from
modules that can run code or touch the system, or with names such as `eval`/`system`/
`load` or dunder attributes, raise `TorchFileError`. (3) Any other global becomes an inert
`Placeholder` subclass that only records what the pickle does with it. The pickle's BUILD
opcode (which would call `__setstate__`/`setattr` on anything) is restricted too: it only
fills Placeholders, an OrderedDict's `__dict__`, and checked numpy arrays and dtypes.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import tarfile
import zipfile
from typing import Any, BinaryIO, Callable, NamedTuple, Optional

import ml_dtypes
import numpy as np

__all__ = ["Placeholder", "TorchFileError", "load"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class TorchFileError(ValueError):
  """Raised for any checkpoint that cannot be read safely and faithfully."""


class Placeholder:
  """Inert stand-in for a global the reader does not know (e.g. a config class).

  `find_class` returns one fresh subclass per unknown global, with `module` and `name`
  set. Calling it, or the pickle instantiating it, gives an instance that records what
  the pickle did; no code of the original class ever runs.

  Attributes:
    module: Module of the original global.
    name: Qualified name of the original global.
    args: Positional arguments the object was created with.
    kwargs: Keyword arguments the object was created with.
    state: What the pickle's BUILD passed (usually the instance `__dict__`).
    items: Key/value pairs set on it (pickled dict subclasses), in order.
    list_items: Values appended to it (pickled list subclasses).
  """

  module: str = ""
  name: str = ""

  def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
    obj = super().__new__(cls)
    obj.args, obj.kwargs, obj.state, obj.items, obj.list_items = args, kwargs, None, {}, []
    return obj

  def __init__(self, *args: Any, **kwargs: Any) -> None:
    """Does nothing: `__new__` already recorded the arguments."""

  def __setstate__(self, state: Any) -> None:
    self.state = state

  def __setitem__(self, key: Any, value: Any) -> None:
    self.items[key] = value

  def __getitem__(self, key: Any) -> Any:
    return self.items[key]

  def append(self, value: Any) -> None:
    self.list_items.append(value)

  def extend(self, values: Any) -> None:
    self.list_items.extend(values)

  def __repr__(self) -> str:
    return f"Placeholder({self.module}.{self.name})"


class _Global:
  """An allow-listed global: our own function behind a name (no `__dict__`)."""

  __slots__ = ("qualname", "_fn")

  def __init__(self, qualname: str, fn: Callable[..., Any]) -> None:
    self.qualname, self._fn = qualname, fn

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    return self._fn(*args, **kwargs)

  def __repr__(self) -> str:
    return f"<global {self.qualname}>"


class _DType(NamedTuple):
  """A torch storage class or dtype global (a tuple, so BUILD cannot mutate it)."""
  qualname: str
  dtype: np.dtype


class _Storage(NamedTuple):
  """One (possibly view-sliced) storage; `data` is None during the legacy dry pass."""
  key: str
  data: Optional[np.ndarray]
  big_endian: bool


_STORAGE_TYPES = {f"{k}Storage": _DType(f"torch.{k}Storage", np.dtype(v)) for k, v in {
    "Float": np.float32, "Double": np.float64, "Half": np.float16,
    "BFloat16": ml_dtypes.bfloat16, "Long": np.int64, "Int": np.int32, "Short": np.int16,
    "Char": np.int8, "Byte": np.uint8, "Bool": np.bool_, "ComplexFloat": np.complex64,
    "ComplexDouble": np.complex128, "Untyped": np.uint8}.items()}
_TORCH_DTYPES = {n: _DType(f"torch.{n}", np.dtype(v)) for names, v in {
    "float32 float": np.float32, "float64 double": np.float64, "float16 half": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "int64 long": np.int64, "int32 int": np.int32,
    "int16 short": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
    "complex64 cfloat": np.complex64, "complex128 cdouble": np.complex128,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    **{n: getattr(ml_dtypes, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                          "float8_e5m2fnuz", "float8_e8m0fnu")
       if hasattr(ml_dtypes, n)}}.items() for n in names.split()}


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise TorchFileError(message)


def _ints(value: Any, what: str) -> tuple[int, ...]:
  _check(isinstance(value, (tuple, list)) and all(
      type(v) is int and v >= 0 for v in value), f"{what} {value!r:.80} is not non-negative ints")
  return tuple(value)


def _rebuild(storage: Any, offset: Any, size: Any, stride: Any, dtype: Any = None,
             metadata: Any = None) -> Optional[np.ndarray]:
  """Materialises one tensor view of `storage` as a C-contiguous numpy copy."""
  _check(isinstance(storage, _Storage), f"tensor is built from a {type(storage).__name__}")
  _check(dtype is None or isinstance(dtype, _DType), f"unsupported tensor dtype {dtype!r:.80}")
  _check(metadata is None or isinstance(metadata, dict), f"bad tensor metadata {metadata!r:.80}")
  (offset,), shape = _ints((offset,), "offset"), _ints(size, "size")
  strides = _ints(stride, "stride")
  _check(len(shape) == len(strides), f"tensor size {shape} and stride {strides} differ in length")
  if storage.data is None:
    return None
  data = storage.data
  if dtype is not None:  # _rebuild_tensor_v3: an untyped byte storage viewed as `dtype`.
    data = np.frombuffer(data, dtype.dtype, count=data.nbytes // dtype.dtype.itemsize)
  if 0 in shape:
    out = np.zeros(shape, data.dtype)
  else:
    last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
    _check(last < data.size, f"storage {storage.key!r} has {data.size} elements but a tensor "
           f"of size {shape}, stride {strides}, offset {offset} needs {last + 1}")
    out = np.lib.stride_tricks.as_strided(
        data[offset:], shape, [s * data.itemsize for s in strides], writeable=False).copy()
  if storage.big_endian:  # complex numbers swap each half separately
    unit = out.itemsize // 2 if out.dtype.kind == "c" else out.itemsize
    if unit > 1:
      out.reshape(-1).view(f"u{unit}").byteswap(inplace=True)
  if metadata and metadata.get("neg"):
    out = -out
  return np.conj(out) if metadata and metadata.get("conj") else out


def _from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
  _check(isinstance(func, _Global) and isinstance(args, tuple),
         f"_rebuild_from_type_v2 of non-allow-listed {func!r:.80}")
  return func(*args)  # the tensor subclass and its Python attributes are dropped


def _plain(dtype: Any) -> bool:
  """Whether `dtype` is a plain numeric numpy dtype (no objects, fields or subarrays)."""
  return isinstance(dtype, np.dtype) and dtype.kind in "biufc" and dtype.fields is None \
      and dtype.subdtype is None and not dtype.hasobject


def _np_reconstruct(cls: Any, shape: Any, typecode: Any) -> np.ndarray:
  _check(cls is _NDARRAY, f"numpy _reconstruct of unsupported class {cls!r:.80}")
  return np.ndarray((0,), np.uint8)  # filled by the pickle's (checked) BUILD


def _np_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
  _check(isinstance(spec, str) and isinstance(align, bool), f"bad numpy dtype {spec!r:.80}")
  dtype = np.dtype(spec, align=align, copy=True)  # a copy: BUILD must not alter shared ones
  _check(_plain(dtype), f"unsupported numpy dtype {spec!r:.40} (only plain numeric dtypes)")
  return dtype


def _np_scalar(dtype: Any, data: Any) -> Any:
  _check(_plain(dtype) and isinstance(data, bytes) and len(data) == dtype.itemsize,
         f"unsupported numpy scalar of {dtype!r:.40}")
  return np.frombuffer(data, dtype)[0]


def _build(inst: Any, state: Any) -> None:
  """The pickle BUILD opcode, restricted to objects whose state is known to be inert."""
  if isinstance(inst, Placeholder):
    inst.__setstate__(state)
  elif type(inst) is collections.OrderedDict and isinstance(state, dict) and all(
      type(k) is str for k in state):  # e.g. a state dict's `_metadata`
    inst.__dict__.update(state)
  elif isinstance(inst, np.dtype) and _plain(inst) and isinstance(state, tuple) \
      and len(state) == 8 and state[0] == 3 and state[1] in ("<", ">", "|", "=") \
      and state[2:] == (None, None, None, -1, -1, 0):
    inst.__setstate__(state)  # only sets the byte order
  elif type(inst) is np.ndarray and isinstance(state, tuple) and len(state) == 5 \
      and state[0] == 1 and _plain(state[2]) and type(state[3]) is bool \
      and isinstance(state[4], bytes):
    inst.__setstate__((1, _ints(state[1], "numpy shape"), *state[2:]))
  else:
    raise TorchFileError(f"pickle sets state on unsupported object {type(inst).__name__}")


def _encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
  _check(isinstance(text, str) and encoding in ("latin1", "latin-1", "utf-8", "utf8", "ascii"),
         f"_codecs.encode of {type(text).__name__} with encoding {encoding!r:.40}")
  return text.encode(encoding)


def _items(items: Any) -> Any:
  _check(isinstance(items, (list, tuple, set, frozenset)), f"bad items {type(items).__name__}")
  return items


def _numbers(*args: Any) -> tuple[Any, ...]:
  _check(all(a is None or isinstance(a, (int, float)) for a in args), f"bad numbers {args!r:.80}")
  return args


def _device(kind: Any, index: Any = None) -> str:
  _check(isinstance(kind, str) and (index is None or type(index) is int), "bad torch.device")
  return kind if index is None else f"{kind}:{index}"


def _no_call(*args: Any) -> None:
  raise TorchFileError("pickle calls numpy.ndarray directly")


_NDARRAY = _Global("numpy.ndarray", _no_call)
_ALLOWED: dict[str, _Global] = {k: _Global(k, f) for k, f in {
    "collections.OrderedDict": lambda items=(): collections.OrderedDict(_items(items)),
    "torch._utils._rebuild_tensor": _rebuild,
    "torch._utils._rebuild_tensor_v2": lambda s, o, z, t, grad=False, hooks=None, meta=None:
        _rebuild(s, o, z, t, metadata=meta),
    "torch._utils._rebuild_tensor_v3": lambda s, o, z, t, grad, hooks, dtype, meta=None:
        _rebuild(s, o, z, t, dtype=dtype, metadata=meta),
    "torch._utils._rebuild_parameter": lambda data, *_: data,
    "torch._utils._rebuild_parameter_with_state": lambda data, *_: data,
    "torch.nn.parameter.Parameter": lambda data=None, *_: data,
    "torch._tensor._rebuild_from_type_v2": _from_type_v2,
    "torch.Size": lambda dims=(): _ints(dims, "torch.Size"),
    "torch.device": _device,
    "numpy.dtype": _np_dtype,
    "_codecs.encode": _encode,
    **{f"{m}.{n}": f for m in ("numpy.core.multiarray", "numpy._core.multiarray")
       for n, f in (("_reconstruct", _np_reconstruct), ("scalar", _np_scalar))},
    **{f"{m}.{n}": f for m in ("builtins", "__builtin__") for n, f in (
        ("set", lambda items=(): set(_items(items))),
        ("frozenset", lambda items=(): frozenset(_items(items))),
        ("complex", lambda re=0.0, im=0.0: complex(*_numbers(re, im))),
        ("slice", lambda *args: slice(*_numbers(*args))))},
}.items()} | {"numpy.ndarray": _NDARRAY}

_DANGEROUS_MODULES = frozenset(
    "builtins __builtin__ os posix nt posixpath ntpath subprocess _posixsubprocess sys "
    "importlib imp shutil socket pickle _pickle cPickle copyreg copy_reg marshal types runpy "
    "code codeop pty webbrowser ctypes _ctypes cffi io _io tempfile pathlib multiprocessing "
    "threading _thread thread signal functools _functools operator _operator inspect gc pdb "
    "bdb timeit trace profile cProfile asyncio glob fileinput zipimport pkgutil site distutils "
    "setuptools pip ensurepip venv urllib urllib2 http httplib ftplib smtplib telnetlib xmlrpc "
    "requests platform sysconfig dill cloudpickle joblib yaml shelve dbm sqlite3 select mmap "
    "resource fcntl zipfile tarfile _codecs codecs numexpr commands popen2 socketserver "
    "SocketServer pydoc tkinter Tkinter turtle idlelib antigravity".split())
_DANGEROUS_PREFIXES = (
    "torch._C", "torch.jit", "torch.hub", "torch.ops", "torch.serialization", "torch.package",
    "torch.utils.cpp_extension", "torch.multiprocessing", "torch.distributed", "torch._dynamo",
    "torch._inductor", "torch.storage", "numpy.f2py", "numpy.distutils", "numpy.testing",
    "numpy.ctypeslib")
_DANGEROUS_NAMES = frozenset(
    "eval exec execfile compile apply open system popen spawn getattr setattr delattr globals "
    "locals vars breakpoint input load loads import_module call check_call check_output run "
    "Popen fork kill remove unlink rmtree from_file fromfile save".split())


def _danger(module: str, name: str) -> Optional[str]:
  """Says why global `module.name` must be refused, or None if a Placeholder will do."""
  parts = name.split(".")
  if not all(parts) or any(p.startswith("__") and p.endswith("__") for p in parts):
    return "dunder or malformed attribute access"
  if module.split(".")[0] in _DANGEROUS_MODULES or any(
      module == p or module.startswith(p + ".") for p in _DANGEROUS_PREFIXES):
    return f"module {module!r} can run code or touch the system"
  if parts[0] in _DANGEROUS_NAMES or parts[-1] in _DANGEROUS_NAMES:
    return f"{name!r} can run code or touch the system"
  if module == "torch._utils" and name.startswith("_rebuild"):
    return "unsupported kind of tensor (sparse, quantized, nested or wrapper subclass)"
  return None


class _Unpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """Restricted unpickler; `fetch(key, dtype, numel)` returns a storage's elements.

  Built on the pure-Python unpickler so that BUILD can be restricted as well.
  """

  dispatch = {**pickle._Unpickler.dispatch,  # pylint: disable=protected-access
              pickle.BUILD[0]: lambda self: _build(self.stack[-2], self.stack.pop())}

  def __init__(self, file: BinaryIO, fetch: Optional[Callable[..., Any]] = None,
               big_endian: bool = False) -> None:
    super().__init__(file, encoding="utf-8")
    self._fetch, self._big_endian = fetch, big_endian
    self._placeholders: dict[tuple[str, str], type] = {}

  def find_class(self, module: str, name: str) -> Any:
    qualname = f"{module}.{name}"
    if qualname in _ALLOWED:
      return _ALLOWED[qualname]
    if module in ("torch", "torch.cuda", "torch.storage") and name in _STORAGE_TYPES:
      return _STORAGE_TYPES[name]
    if module == "torch" and name in _TORCH_DTYPES:
      return _TORCH_DTYPES[name]
    reason = _danger(module, name)
    _check(reason is None, f"refusing global {qualname!r}: {reason}")
    if (module, name) not in self._placeholders:
      self._placeholders[module, name] = type(
          name.rsplit(".", 1)[-1], (Placeholder,), {"module": module, "name": name})
    return self._placeholders[module, name]

  def persistent_load(self, pid: Any) -> Any:
    kind = pid[0] if isinstance(pid, tuple) and pid else None
    kind = kind.decode("ascii", "replace") if isinstance(kind, bytes) else kind
    if kind == "module" and len(pid) >= 2:  # legacy whole-module save: the class itself
      return pid[1]
    _check(kind == "storage" and len(pid) in (5, 6) and self._fetch is not None,
           f"unsupported persistent id {pid!r:.120}")
    stype, key, _location, numel = pid[1:5]
    _check(isinstance(stype, _DType), f"storage of unsupported type {stype!r:.80}")
    _check(isinstance(key, str) and type(numel) is int and numel >= 0,
           f"malformed storage reference {pid!r:.120}")
    data = self._fetch(key, stype.dtype, numel)
    view = pid[5] if len(pid) == 6 else None
    if view is not None:  # legacy storage view: (view_key, offset, size) in elements
      _check(isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str),
             f"malformed storage view {view!r:.120}")
      (offset, size), key = _ints(view[1:], "storage view"), view[0]
      if data is not None:
        _check(offset + size <= data.size, f"storage view {key!r} exceeds its storage")
        data = data[offset:offset + size]
    return _Storage(key, data, self._big_endian)


def _unpickle(f: BinaryIO, what: str, fetch: Any = None, big_endian: bool = False) -> Any:
  try:
    return _Unpickler(f, fetch, big_endian).load()
  except TorchFileError:
    raise
  except Exception as e:  # EOFError, UnpicklingError, TypeError, MemoryError, ...
    if isinstance(e, (EOFError, struct.error)) or "truncated" in str(e) or "exhaust" in str(e):
      raise TorchFileError(f"{what} is truncated") from e
    raise TorchFileError(f"{what} is corrupt ({type(e).__name__}: {e})") from e


def _read_member(zf: zipfile.ZipFile, name: str) -> bytes:
  try:
    return zf.read(name)
  except KeyError:
    raise TorchFileError(f"archive member {name!r} is missing") from None
  except Exception as e:  # BadZipFile (CRC, header), zlib.error, EOFError, OSError
    raise TorchFileError(f"archive member {name!r} is corrupt ({e})") from e


def _load_zip(f: BinaryIO) -> Any:
  try:
    zf = zipfile.ZipFile(f)
  except Exception as e:
    raise TorchFileError(f"zip archive is truncated or corrupt (no central directory: {e})") from e
  with zf:
    names = zf.namelist()
    pkls = [n for n in names if n.count("/") <= 1 and n.rsplit("/", 1)[-1] == "data.pkl"]
    _check(len(pkls) == 1, f"zip archive has {len(pkls)} data.pkl records, expected one")
    prefix = pkls[0][:-len("data.pkl")]
    order = b"little"
    if f"{prefix}byteorder" in names:
      order = _read_member(zf, f"{prefix}byteorder").strip()
    _check(order in (b"little", b"big"), f"unknown byteorder {order!r:.40}")
    raw: dict[str, bytes] = {}

    def fetch(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
      name = f"{prefix}data/{key}"
      if key not in raw:
        raw[key] = _read_member(zf, name)
      _check(len(raw[key]) >= numel * dtype.itemsize, f"archive member {name!r} has "
             f"{len(raw[key])} bytes but its storage needs {numel * dtype.itemsize} (truncated?)")
      return np.frombuffer(raw[key], dtype, count=numel)

    return _unpickle(io.BytesIO(_read_member(zf, pkls[0])), pkls[0], fetch, order == b"big")


def _load_legacy(f: BinaryIO) -> Any:
  try:
    magic = _Unpickler(f).load()
  except TorchFileError:
    raise
  except Exception:
    magic = None
  _check(type(magic) is int and magic == _LEGACY_MAGIC, "not a PyTorch checkpoint (neither "
         "a zip archive nor a legacy file starting with torch's magic number)")
  version = _unpickle(f, "legacy protocol version")
  _check(version == _LEGACY_PROTOCOL, f"unsupported legacy protocol version {version!r:.40}")
  _unpickle(f, "legacy sys_info")  # storages are written little-endian whatever the host
  start, dtypes = f.tell(), {}

  def record(key: str, dtype: np.dtype, numel: int) -> None:
    dtypes.setdefault(key, dtype)

  # Dry pass: the storages follow the object pickle, so first learn each one's dtype.
  _unpickle(f, "legacy object pickle", record)
  keys = _unpickle(f, "legacy storage key list")
  _check(isinstance(keys, list) and all(isinstance(k, str) for k in keys),
         "legacy storage key list is malformed")
  size, blobs = os.fstat(f.fileno()).st_size, {}
  for key in keys:
    _check(key in dtypes, f"legacy storage {key!r} is not used by the object pickle")
    header = f.read(8)
    nbytes = int.from_bytes(header, "little") * dtypes[key].itemsize
    _check(len(header) == 8 and f.tell() + nbytes <= size,
           f"legacy file is truncated inside storage {key!r}")
    blobs[key] = f.read(nbytes)

  def fetch(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    _check(len(blobs.get(key, b"")) >= numel * dtype.itemsize,
           f"legacy storage {key!r} is missing or shorter than {numel} elements")
    return np.frombuffer(blobs[key], dtype, count=numel)

  f.seek(start)
  return _unpickle(f, "legacy object pickle", fetch)


def load(path: str | os.PathLike) -> Any:
  """Loads a `torch.save` checkpoint safely, with tensors as numpy arrays.

  Args:
    path: A file written by `torch.save`, in the zip or the legacy layout.

  Returns:
    The saved object: dicts and OrderedDicts (key order kept), lists, numbers, strings,
    numpy arrays for tensors (a tensor pickled once and referenced twice, e.g. tied
    weights, stays one array), and `Placeholder` instances for unknown classes.

  Raises:
    TorchFileError: The file is truncated, corrupt, not a torch checkpoint, uses an
      unsupported feature or names a dangerous global; the message names the file.
    OSError: The file cannot be opened.
  """
  name = os.fspath(path)
  with open(name, "rb") as f:
    try:
      if f.read(4) == b"PK\x03\x04" or zipfile.is_zipfile(f):
        f.seek(0)
        return _load_zip(f)
      f.seek(0)
      _check(not tarfile.is_tarfile(f), "old tar-based torch format (torch < 0.4) is "
             "not supported; re-save it with torch >= 1.6")
      f.seek(0)
      return _load_legacy(f)
    except TorchFileError as e:
      raise TorchFileError(f"{name}: {e}") from e.__cause__
    except Exception as e:
      raise TorchFileError(f"{name}: unreadable ({type(e).__name__}: {e})") from e
