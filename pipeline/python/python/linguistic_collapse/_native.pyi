"""Type stubs of the compiled module (the public API is in ``_lake``)."""

from typing import Any, Callable, Dict, List, Optional, Tuple

__version__: str

class PipelineError(RuntimeError):
    """An error of the pipeline that no built-in exception describes."""

class DamagedArtifactError(PipelineError):
    """A lake artifact whose bytes disagree with its manifest.

    ``args`` is ``(message, path)``: the damaged file's lake path.
    """

class ClassStats:
    """Running per-class count, mean and M2 of ``dim``-wide samples, in f64.

    ``update`` reads numpy arrays in place (float16/32/64, C-contiguous)
    with the GIL released; ``merge`` combines accumulators (Chan's formula);
    instances pickle exactly.
    """

    def __init__(self, num_classes: int, dim: int) -> None: ...
    @property
    def num_classes(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def samples(self) -> int: ...
    def update(self, hidden: Any, labels: Any, ignore_index: int = -100) -> None: ...
    def merge(self, other: "ClassStats") -> None: ...
    @property
    def counts(self) -> Any: ...
    @property
    def means(self) -> Any: ...
    @property
    def m2(self) -> Any: ...

BarState = Tuple[int, str, int, Optional[int], str, bool]

class Lake:
    def __init__(self, url: Optional[str] = None, config: Optional[str] = None) -> None: ...
    @property
    def url(self) -> str: ...
    def sql(self, query: str, memory_limit: Optional[str] = None, timeout: Optional[float] = None) -> Any: ...
    def status(self) -> List[Tuple[str, str, int, int, str, str]]: ...
    def verify(
        self, table: Optional[str] = None
    ) -> Tuple[int, int, List[Tuple[str, str, str]], str]: ...
    def run_stage(
        self,
        stage: str,
        params: Dict[str, str],
        progress: Optional[Callable[[List[BarState]], None]] = None,
    ) -> Tuple[str, List[Dict[str, Any]]]: ...

def stages() -> List[Tuple[str, str, str, str, List[Tuple[str, Optional[str], str]]]]: ...
def cli_main(argv: List[str]) -> int: ...
def init_logging(level: str = "warn") -> bool: ...
