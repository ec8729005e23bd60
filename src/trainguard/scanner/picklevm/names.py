"""Which imports a pickle may make: allowlist first, then what is known to be dangerous.

A global on :data:`SAFE` rebuilds plain data (tensors, arrays, containers).
Anything else is at least "imports code" (medium).  A global under
:data:`DENIED_MODULES` or :data:`DENIED_NAMES` can run code, touch files,
processes, the network or the import system, and is critical.  A standard
library global that is on neither list is high: obscure stdlib helpers
(``uuid._get_command_stdout``, ``imaplib.IMAP4_stream``) are how payloads slip
past denylists, so unknown stdlib is never waved through as "just a class".
"""

from __future__ import annotations

import _compat_pickle
import sys
from dataclasses import dataclass

from trainguard.findings import Severity

_TORCH_DTYPES = (
    "float32 float float64 double float16 half bfloat16 complex32 chalf complex64 cfloat "
    "complex128 cdouble uint8 uint16 uint32 uint64 int8 int16 short int32 int int64 long bool "
    "qint8 quint8 qint32 quint4x2 quint2x4 float8_e4m3fn float8_e5m2 float8_e4m3fnuz "
    "float8_e5m2fnuz float8_e8m0fnu float4_e2m1fn_x2 bits8 bits16 bits1x8 bits2x4 bits4x2"
).split()
_TORCH_STORAGES = (
    "Float Double Half BFloat16 Long Int Short Char Byte Bool ComplexFloat ComplexDouble "
    "QUInt8 QInt8 QInt32 QUInt4x2 QUInt2x4"
).split()
_NUMPY_SCALARS = (
    "bool_ int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64 "
    "longdouble complex64 complex128 clongdouble str_ bytes_ void datetime64 timedelta64 "
    "intc uintc intp uintp longlong ulonglong half single double"
).split()

SAFE: frozenset[str] = frozenset(
    [
        # containers and scalars
        "builtins.set",
        "builtins.frozenset",
        "builtins.list",
        "builtins.dict",
        "builtins.tuple",
        "builtins.bytearray",
        "builtins.bytes",
        "builtins.str",
        "builtins.int",
        "builtins.float",
        "builtins.complex",
        "builtins.bool",
        "builtins.slice",
        "builtins.range",
        "builtins.object",
        "builtins.NoneType",
        "collections.OrderedDict",
        "collections.defaultdict",
        "collections.Counter",
        "collections.deque",
        "copyreg._reconstructor",
        "copyreg.__newobj__",
        "copyreg.__newobj_ex__",
        "_codecs.encode",
        "datetime.datetime",
        "datetime.date",
        "datetime.time",
        "datetime.timedelta",
        "datetime.timezone",
        "decimal.Decimal",
        "fractions.Fraction",
        "uuid.UUID",
        "pathlib.Path",
        "pathlib.PosixPath",
        "pathlib.WindowsPath",
        "pathlib.PurePath",
        "pathlib.PurePosixPath",
        "pathlib.PureWindowsPath",
        # torch tensors, storages and their metadata
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch._utils._rebuild_sparse_tensor",
        "torch._utils._rebuild_qtensor",
        "torch._utils._rebuild_meta_tensor_no_storage",
        "torch._utils._rebuild_wrapper_subclass",
        "torch._utils._rebuild_nested_tensor",
        "torch._utils._rebuild_device_tensor_from_numpy",
        "torch._utils._rebuild_device_tensor_from_cpu_tensor",
        "torch._tensor._rebuild_from_type",
        "torch._tensor._rebuild_from_type_v2",
        "torch.Tensor",
        "torch.nn.parameter.Parameter",
        "torch.nn.parameter.Buffer",
        "torch.Size",
        "torch.device",
        "torch.serialization._get_layout",
        "torch.strided",
        "torch.sparse_coo",
        "torch.sparse_csr",
        "torch._mkldnn",
        "torch.contiguous_format",
        "torch.channels_last",
        "torch.channels_last_3d",
        "torch.preserve_format",
        "torch.per_tensor_affine",
        "torch.per_channel_affine",
        "torch.storage.UntypedStorage",
        "torch.storage.TypedStorage",
        "torch.UntypedStorage",
        "torch.torch_version.TorchVersion",
        # TorchScript archives' pickles: each returns its argument unchanged
        # (torch/jit/_pickle.py), so calling them rebuilds plain data.
        "torch.jit._pickle.build_intlist",
        "torch.jit._pickle.build_tensorlist",
        "torch.jit._pickle.build_doublelist",
        "torch.jit._pickle.build_boollist",
        "torch.jit._pickle.build_tensor_from_id",
        "torch.jit._pickle.restore_type_tag",
        *(f"torch.{d}" for d in _TORCH_DTYPES),
        *(f"torch.{s}Storage" for s in _TORCH_STORAGES),
        *(f"torch.cuda.{s}Storage" for s in _TORCH_STORAGES),
        # numpy arrays, dtypes and random states
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.numeric._frombuffer",
        "numpy._core.numeric._frombuffer",
        "numpy.ma.core._mareconstruct",
        "numpy.random._pickle.__randomstate_ctor",
        "numpy.random._pickle.__bit_generator_ctor",
        "numpy.random._pickle.__generator_ctor",
        "numpy.random.mtrand.RandomState",
        "numpy.random._mt19937.MT19937",
        "numpy.random._pcg64.PCG64",
        "numpy.random._philox.Philox",
        "numpy.random._sfc64.SFC64",
        *(f"numpy.{s}" for s in _NUMPY_SCALARS),
        *(f"numpy.dtypes.{s.capitalize()}DType" for s in ("float16", "float32", "float64")),
        # joblib's wrappers for arrays stored beside the pickle
        "joblib.numpy_pickle.NumpyArrayWrapper",
        "joblib.numpy_pickle_compat.NDArrayWrapper",
        "joblib.numpy_pickle_compat.ZNDArrayWrapper",
    ]
)

# Whole modules (and every submodule) that can run code or reach outside the process.
DENIED_MODULES: frozenset[str] = frozenset(
    """
    os posix nt subprocess sys runpy pip importlib pkgutil zipimport marshal pickle _pickle
    cPickle dill cloudpickle shelve cProfile profile timeit pdb bdb code codeop trace doctest
    pydoc inspect shutil socket _socket ssl http urllib urllib3 requests httpx aiohttp ftplib
    smtplib imaplib poplib telnetlib nntplib xmlrpc webbrowser ctypes _ctypes cffi
    multiprocessing concurrent asyncio threading _thread signal pty tty fcntl resource mmap
    tempfile io _io _posixsubprocess gc sysconfig site distutils setuptools venv ensurepip
    platform operator _operator functools types logging uuid
    tensorflow keras jax IPython
    numpy.testing numpy.f2py numpy.distutils numpy.ctypeslib numpy.lib.npyio numpy.load
    torch._inductor torch.utils.cpp_extension torch.utils.collect_env torch.hub torch.package
    torch.jit torch._dynamo torch.fx torch.compile torch.distributed torch.ops torch._ops
    torch.serialization torch.load torch.multiprocessing
    torch._C torch.testing torch.onnx torch.export
    joblib.load joblib.numpy_pickle.load joblib.dump joblib.parallel joblib.externals
    """.split()
)

DENIED_NAMES: frozenset[str] = frozenset(
    """
    builtins.exec builtins.eval builtins.compile builtins.getattr builtins.setattr
    builtins.delattr builtins.__import__ builtins.open builtins.input builtins.breakpoint
    builtins.globals builtins.locals builtins.vars builtins.exit builtins.quit builtins.help
    builtins.__build_class__ builtins.memoryview builtins.type builtins.super builtins.classmethod
    builtins.staticmethod builtins.property builtins.print builtins.dir builtins.callable
    builtins.map builtins.filter builtins.iter builtins.next builtins.apply builtins.execfile
    builtins.reload builtins.file builtins.hasattr
    codecs.open codecs.StreamReader codecs.StreamWriter codecs.EncodedFile
    """.split()
)

# Parts of a dotted name that only an attack would walk through.
_DANGEROUS_PARTS = frozenset(
    """
    __globals__ __builtins__ __import__ __subclasses__ __class__ __base__ __bases__ __mro__
    __dict__ __code__ __closure__ __func__ __self__ __loader__ __spec__ __getattribute__
    __getattr__ __setattr__ __delattr__ __reduce__ __reduce_ex__ __init_subclass__
    os sys subprocess system popen exec eval compile getattr setattr builtins
    """.split()
)

# Methods that change an object in place: reached through a dotted global they
# let a pickle edit tensors or containers while it loads (Sleepy Pickle).
_MUTATORS = frozenset(
    """
    __setitem__ __setstate__ __iadd__ __imul__ __isub__ update setdefault pop popitem clear
    copy_ set_ fill_ zero_ add_ sub_ mul_ div_ neg_ normal_ uniform_ bernoulli_ random_
    index_put_ index_fill_ index_add_ masked_fill_ scatter_ scatter_add_ put_ resize_
    transpose_ t_ squeeze_ unsqueeze_ clamp_ requires_grad_ register_hook load_state_dict
    register_forward_hook register_forward_pre_hook register_full_backward_hook apply
    """.split()
)

# Names that map, read or write files when called: a tensor or array built by
# one of these aliases a file (torch.from_file with shared=True writes through),
# or the call writes one.  Judged by the last part of the name, wherever it lives.
_FILE_ACCESSORS = frozenset(
    """
    from_file fromfile memmap open_memmap tofile save savez savez_compressed savetxt
    loadtxt genfromtxt fromregex load load_state_dict_from_url download_url_to_file
    """.split()
)

# Modules whose every function writes into tensors it is given (nn.init), and the
# top-level packages whose trailing-underscore functions are in-place (torch.add_).
_MUTATOR_MODULES = frozenset(["torch.nn.init"])
_MUTATOR_NAMES = frozenset(
    [
        "torch.nn.utils.vector_to_parameters",
        "torch.nn.utils.convert_parameters.vector_to_parameters",
    ]
)
_INPLACE_PACKAGES = frozenset(["torch", "torchvision", "torchaudio", "functorch"])

# Pure built-in functions: the result is a value computed from data the pickle
# already built (a hash, a length); they reach nothing outside the process.
PURE_BUILTINS: frozenset[str] = frozenset(
    f"builtins.{n}"
    for n in """
    hash len abs round divmod pow min max sum repr ascii format ord chr bin oct hex id
    isinstance issubclass all any sorted reversed enumerate zip
    """.split()
)

# Standard-library names that are data when loaded: type hints (OmegaConf and
# Lightning store typing.Any in every checkpoint), time zones, regex flags, a
# namespace object, a logger looked up by name.  Exact names only: their modules
# also hold code runners (typing.get_type_hints evaluates strings, logging.config
# listens on a socket, types.FunctionType builds functions).
STDLIB_DATA: frozenset[str] = frozenset(
    [
        *(
            f"typing.{n}"
            for n in """
            Any Union Optional List Dict Tuple Set FrozenSet Type Callable Literal ClassVar
            Final Sequence Mapping MutableMapping Iterable Iterator NoReturn Never Annotated
            DefaultDict OrderedDict Deque Counter TypeVar Generic
            """.split()
        ),
        "types.SimpleNamespace",
        "types.NoneType",
        # arrays and random states of old pickles (Python 2 era gensim, scikit-learn)
        "array.array",
        "array._array_reconstructor",
        "random.Random",
        "zoneinfo.ZoneInfo",
        "datetime.tzinfo",
        "re.RegexFlag",
        "re.Pattern",
        "logging.getLogger",
        "enum.Enum",
    ]
)

# Non-stdlib globals whose purpose is well known: reported as medium with a
# message that says what it is, so a user can decide quickly.
KNOWN_BENIGN_PREFIXES: dict[str, str] = {
    "sklearn.": "a scikit-learn estimator",
    "torch.nn.modules.": "a PyTorch module (a whole nn.Module was pickled)",
    "torch.optim.": "a PyTorch optimizer or scheduler object",
    "transformers.": "a Hugging Face transformers object",
    "argparse.Namespace": "training arguments (argparse.Namespace)",
    "__main__.": "a class from the script that saved the file",
}

STDLIB_KNOWN_BENIGN: frozenset[str] = frozenset(
    [
        "argparse.Namespace",
        "types.SimpleNamespace",
        "enum.Enum",
        "collections.namedtuple",
        "re._compile",
        "re.compile",
        "copy._reconstruct",
    ]
)


# Benign pickles of tensors made with plain pickle.dumps carry a whole torch
# checkpoint as bytes; the bytes are scanned as a file of their own.
NESTED_LOADERS: frozenset[str] = frozenset(["torch.storage._load_from_bytes"])


@dataclass(frozen=True)
class GlobalVerdict:
    severity: Severity | None  # None: allowlisted, no finding
    rule: str
    reason: str


def normalise(module: str, name: str) -> list[tuple[str, str]]:
    """The (module, name) pairs a loader may really resolve this global to.

    Unpicklers map Python 2 names (``__builtin__``, ``copy_reg``) to their
    Python 3 modules (``fix_imports``, on by default), so the mapped name is
    what gets imported and what is judged.
    """
    mapped = _compat_pickle.NAME_MAPPING.get((module, name))
    if mapped:
        return [mapped]
    if module in _compat_pickle.IMPORT_MAPPING:
        return [(_compat_pickle.IMPORT_MAPPING[module], name)]
    return [(module, name)]


def _in_module_set(qualified: str, modules: frozenset[str]) -> bool:
    parts = qualified.split(".")
    return any(".".join(parts[:i]) in modules for i in range(1, len(parts) + 1))


def classify(module: str, name: str, allow: frozenset[str] = frozenset()) -> GlobalVerdict:
    worst: GlobalVerdict | None = None
    for mod, nm in normalise(module, name):
        v = _classify_one(mod, nm, allow)
        if worst is None or _rank(v) > _rank(worst):
            worst = v
    assert worst is not None
    return worst


def _rank(v: GlobalVerdict) -> int:
    return -1 if v.severity is None else int(v.severity)


def _is_mutator(module: str, parts: list[str]) -> bool:
    """In-place tensor edits under any name: ``Tensor.copy_``, ``torch.index_put_``, nn.init."""
    last = parts[-1]
    if len(parts) > 1 and last in _MUTATORS:
        return True
    if f"{module}.{'.'.join(parts)}" in _MUTATOR_NAMES:
        return True
    if _in_module_set(module, _MUTATOR_MODULES):
        return True
    top = module.split(".")[0]
    return top in _INPLACE_PACKAGES and last.endswith("_") and not last.startswith("_")


def _classify_one(module: str, name: str, allow: frozenset[str]) -> GlobalVerdict:
    qualified = f"{module}.{name}"
    if not module or not name:
        return GlobalVerdict(Severity.CRITICAL, "TG104", "empty module or name")
    parts = name.split(".")
    if any(p in _DANGEROUS_PARTS for p in parts[:-1]) or (
        len(parts) > 1 and parts[-1] in _DANGEROUS_PARTS
    ):
        return GlobalVerdict(
            Severity.CRITICAL,
            "TG101",
            f"walks an attribute chain through {name!r} to reach code or the interpreter",
        )
    if qualified in SAFE:
        return GlobalVerdict(None, "", "allowlisted")
    if qualified in NESTED_LOADERS:
        return GlobalVerdict(
            Severity.MEDIUM,
            "TG103",
            f"{qualified} loads embedded bytes as a checkpoint (analysed as a nested file)",
        )
    if qualified in PURE_BUILTINS:
        return GlobalVerdict(
            Severity.LOW, "TG103", f"imports {qualified} (a pure built-in function)"
        )
    if qualified in STDLIB_DATA:
        return GlobalVerdict(
            Severity.LOW, "TG103", f"imports {qualified} (a standard-library data type)"
        )
    if parts[-1] in _FILE_ACCESSORS:
        return GlobalVerdict(
            Severity.CRITICAL,
            "TG101",
            f"{qualified} reads, maps or writes files when called",
        )
    if qualified in DENIED_NAMES or _in_module_set(qualified, DENIED_MODULES):
        return GlobalVerdict(
            Severity.CRITICAL, "TG101", f"{qualified} can run code or reach outside the process"
        )
    if _is_mutator(module, parts):
        return GlobalVerdict(
            Severity.CRITICAL,
            "TG105",
            f"{qualified} changes an object in place while the file loads",
        )
    if qualified in allow or _in_module_set(qualified, allow):
        return GlobalVerdict(None, "", "allowlisted")
    top = module.split(".")[0]
    if qualified in STDLIB_KNOWN_BENIGN:
        return GlobalVerdict(
            Severity.MEDIUM, "TG103", f"imports {qualified} when loaded (a standard-library class)"
        )
    if top in sys.stdlib_module_names:
        return GlobalVerdict(
            Severity.HIGH,
            "TG102",
            f"imports the standard-library object {qualified}, which is not on the allowlist",
        )
    for prefix, what in KNOWN_BENIGN_PREFIXES.items():
        if qualified.startswith(prefix):
            return GlobalVerdict(
                Severity.MEDIUM, "TG103", f"imports {qualified} when loaded ({what})"
            )
    return GlobalVerdict(Severity.MEDIUM, "TG103", f"imports {qualified} when loaded")
