"""Job assembly: the stages wired into one streaming Ray Data job.

Each stage is a plain function over :class:`PageWork` (testable without Ray, chained in
:mod:`pipeline.stages`); this module only adapts them to Ray rows. A row carries one pickled ``PageWork``, so a page's image and lines travel
together through every stage with no shuffle, and the driver only ever sees text.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import pickle
import queue
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from logging.handlers import QueueHandler
from typing import Any, Callable, Collection, Generator, Iterator, Literal, Sequence

import ray
from ray._private import ray_constants
from ray._private.resource_and_label_spec import ResourceAndLabelSpec
from ray.data import ActorPoolStrategy
from ray.exceptions import RayTaskError
from ray.remote_function import RemoteFunction

from operators.checkpoint import model_named, recorded_model, resolve_checkpoint, weights_sha256
from operators.errors import ConfigError, InternalError, PipelineError, RecognizersLost, WriteFailed
from operators.storage import is_uri, recorded_source
from operators.ingest import (DocumentPlan, KnownDocument, find_inputs, input_copies, local_document_of_bytes,
                              mark_duplicates, source_id, triage, unchanged_local_document)
from operators.pages import selected_pages
from operators.preprocess import LinePreprocessor
from operators.rasterize import PageRange, page_ranges, rasterize
from operators.records import DocumentRecord, PageWork
from operators.write import (
    ParquetSink,
    PublishedDocuments,
    Reading,
    Retirement,
    WriteSummary,
    check_output_is_ours,
    check_output_writable,
    exports_tidied_when_stopped,
    output_folders,
    output_lock,
    published_documents,
    recover_output,
    retire_documents,
)
from pipeline.config import JobConfig
from pipeline.progress import JobProgress, quiet_ray_data
from pipeline.stages import layout_page

log = logging.getLogger(__name__)

Mode = Literal["recognize", "detect"]
#: Seconds a stopped iteration's threads get to leave their Ray calls before Ray shuts down.
DATASET_THREADS_GRACE_S = 2.0
#: Triage tasks in flight at once: this many per CPU of the cluster, and at least the minimum.
TRIAGE_WINDOW_PER_CPU = 4
TRIAGE_WINDOW_MIN = 16
#: Seconds to wait for a cluster's head to answer before saying it cannot be reached.
CLUSTER_CONNECT_TIMEOUT_S = 10.0
#: Seconds between looks at a cluster's nodes while a job runs on it, at most (:class:`RecognizerNodesWatch`).
RECOGNIZER_NODES_CHECK_S = 10.0
#: Documents whose exports may be in flight at once, per CPU of the cluster.
EXPORTS_IN_FLIGHT_PER_CPU = 2


@dataclass(frozen=True)
class JobSummary:
    output: str
    documents_skipped: int
    written: WriteSummary
    seconds: float
    left_out: dict[str, int]  # files in folders and globs that are no documents, by suffix
    retried: int = 0  # failed documents the output held, taken out and read again (:func:`_check_against_output`)
    unselected: int = 0  # documents with no page in --pages, not written
    failed_earlier: int = 0  # of those already done, the ones the output holds as failed
    recent: int = 0  # files modified too lately to read (rasterize.min_file_age_s), left for a later run
    min_file_age_s: float = 0.0

    @property
    def pages_per_second(self) -> float:
        return self.written.pages / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        w = self.written
        recent = f"{_recent_line(self.recent, self.min_file_age_s)}\n" if self.recent else ""
        return (
            f"output: {self.output}\n"
            f"documents: {w.documents_ok} ok, {w.documents_failed} failed, {w.documents_duplicate} duplicates, "
            f"{self.documents_skipped} already done{_failed_earlier_note(self.failed_earlier, self.output)}"
            f"{f', {_failed_documents(self.retried)} taken out and read again' if self.retried else ''}"
            f"{f', {self.unselected} without a page in --pages' if self.unselected else ''}\n"
            f"{_left_out_line(self.left_out)}\n"
            f"{recent}"
            f"pages: {w.pages} ({w.pages_failed} failed), lines: {w.lines}\n"
            f"time: {self.seconds:.1f} s, {self.pages_per_second:.2f} pages/s"
        )


def _left_out_line(left_out: dict[str, int]) -> str:
    return f"left out (no document): {', '.join(f'{count} {key}' for key, count in sorted(left_out.items())) or 'none'}"


def _recent_line(recent: int, min_file_age_s: float) -> str:
    """What a run says of the files ``rasterize.min_file_age_s`` set apart."""
    return (f"not read yet: {recent} {'file' if recent == 1 else 'files'} modified less than {min_file_age_s:g} s ago "
            f"(rasterize.min_file_age_s), for a later run")


def _failed_earlier_note(count: int, output: str) -> str:
    """A command to copy (`show --failed` alone could not be run as it was written)."""
    return f" ({count} of them failed: `trocr-pipeline show {output} --failed` names them)" if count else ""


def _failed_earlier(plans: list[DocumentPlan], reading: list[DocumentPlan], published: PublishedDocuments) -> int:
    """How many inputs a run skips as done are failed documents in the output (their bytes': a copy's, a duplicate's
    too). A rerun after a stop had said nothing of them and exited 0: only the run that was stopped had told."""
    failed, read = published.failed(), {plan.source for plan in reading}
    return sum(plan.doc_id in failed for plan in plans if plan.source not in read)


def _runs_locally(config: JobConfig) -> bool:
    """No cluster named by the config or by ``ray job submit`` (RAY_ADDRESS): one machine's CPUs."""
    return config.ray.address is None and not os.environ.get("RAY_ADDRESS")


def check_cpus_left_for_pages(config: JobConfig, cpus: float, mode: Mode = "recognize") -> None:
    """Refuse a local recognizer pool that holds every one of ``cpus``: rasterize and layout would never
    get a CPU, and Ray Data would wait for them until its no-progress timeout instead of failing.
    Clusters are left alone (an autoscaler may add the CPUs)."""
    if mode != "recognize" or not _runs_locally(config):
        return
    recognize = config.recognize
    actors = recognize.concurrency[0] if isinstance(recognize.concurrency, tuple) else recognize.concurrency
    held = actors * recognize.num_cpus
    page_cpus = _page_task_cpus(config)
    if held + page_cpus > cpus:
        raise ConfigError(
            f"the recognizer pool ({actors} actor(s) at least, recognize.concurrency={recognize.concurrency}, "
            f"x recognize.num_cpus={recognize.num_cpus:g}) holds {held:g} of the local Ray instance's {cpus:g} "
            f"CPUs, and rasterize and layout need {page_cpus:g} more: lower recognize.concurrency or "
            f"recognize.num_cpus (e.g. --set recognize.num_cpus=0.5), or give Ray more CPUs (ray.num_cpus)")


class _NodeProbe:
    def ready(self) -> bool:
        return True


def _wait_for_a_recognizer_node(config: JobConfig) -> None:
    """On a cluster, wait for a node to take one recognizer actor, shown by an empty actor that asks for what one
    asks for: the job fails after ``recognize.start_timeout_s`` where none does and none is added, instead of Ray
    Data waiting for ever. One is enough: the pool runs with the actors that fit."""
    recognize = config.recognize
    probe = ray.remote(num_cpus=recognize.num_cpus, num_gpus=recognize.num_gpus,
                       accelerator_type=recognize.accelerator_type)(_NodeProbe).remote()
    try:
        ray.get(probe.ready.remote(), timeout=recognize.start_timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        raise ConfigError(
            f"no node of the cluster took a recognizer actor within recognize.start_timeout_s="
            f"{recognize.start_timeout_s:g} s: none gives what one asks for (num_gpus={recognize.num_gpus:g}, "
            f"num_cpus={recognize.num_cpus:g}, accelerator_type={recognize.accelerator_type}) and none was added "
            "(`ray status` and the autoscaler's log say why); ask for less (e.g. --set "
            "recognize.accelerator_type=null), or add such nodes") from exc
    finally:
        ray.kill(probe)


def _offers_a_recognizer(node: dict[str, Any], config: JobConfig) -> bool:
    """Whether a node (as ``ray.nodes()`` lists it) is alive and has what one recognizer actor asks for."""
    recognize, resources = config.recognize, node["Resources"]
    return (node["Alive"] and resources.get("CPU", 0.0) >= recognize.num_cpus
            and resources.get("GPU", 0.0) >= recognize.num_gpus
            and (recognize.accelerator_type is None or f"accelerator_type:{recognize.accelerator_type}" in resources))


class RecognizerNodesWatch:
    """On a cluster, while the pages are read: when no node that can run a recognizer actor has been there for
    ``recognize.lost_timeout_s`` (the GPU nodes lost, spot instances taken back, and none added), the main thread
    is interrupted by a signal (SIGUSR1, raising KeyboardInterrupt as Ctrl-C does): Ray Data would wait for such a
    node for ever, in calls only a real signal wakes. :attr:`lost` tells that interruption from a Ctrl-C.
    :meth:`stop` once the pages are read: the exports still being written need no recognizer."""

    def __init__(self, config: JobConfig, mode: Mode) -> None:
        self.config = config
        self.lost: RecognizersLost | None = None  # the error to raise instead of the KeyboardInterrupt
        # a local run's one node is the driver's; only the main thread can take a signal
        self._active = (mode == "recognize" and not _runs_locally(config)
                        and threading.current_thread() is threading.main_thread())
        self._stopped, self._interrupting = threading.Event(), threading.Lock()
        self._watcher = threading.Thread(target=self._watch, name="recognizer-nodes-watch", daemon=True)
        self._previous_handler: Any = None
        self._restored = False

    def __enter__(self) -> RecognizerNodesWatch:
        if self._active:
            self._previous_handler = signal.signal(signal.SIGUSR1, self._interrupted)
            self._watcher.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc_info: object) -> None:
        try:
            self.stop()
        except KeyboardInterrupt:
            if kind is None or self.lost is None:
                raise
            # the watch's own signal, landing as another error (a full disk) ends the job: that error stands

    def stop(self) -> None:
        """Watch no more; a signal sent as the watch was stopped does nothing when it lands. SIGUSR1's handler is
        given back even when a Ctrl-C lands while the watcher is waited for."""
        if not self._active or self._restored:
            return
        try:
            with self._interrupting:
                self._stopped.set()
            self._watcher.join()
        finally:
            signal.signal(signal.SIGUSR1, self._previous_handler)
            self._restored = True

    def _interrupted(self, signum: int, frame: Any) -> None:
        if not self._stopped.is_set():
            raise KeyboardInterrupt

    def _watch(self) -> None:
        timeout = self.config.recognize.lost_timeout_s
        since = None
        while not self._stopped.wait(min(RECOGNIZER_NODES_CHECK_S, timeout / 2)):
            try:
                nodes = ray.nodes()
            except Exception:  # noqa: BLE001 - the GCS slow to answer: looked at again next time
                log.warning("cannot list the cluster's nodes to look for recognizer nodes", exc_info=True)
                continue
            if any(_offers_a_recognizer(node, self.config) for node in nodes):
                since = None
            elif since is None:
                since = time.monotonic()
            elif time.monotonic() - since >= timeout:
                with self._interrupting:
                    if self._stopped.is_set():
                        return
                    recognize = self.config.recognize
                    self.lost = RecognizersLost(
                        "the cluster has had no node that can run a recognizer actor "
                        f"(num_gpus={recognize.num_gpus:g}, num_cpus={recognize.num_cpus:g}, "
                        f"accelerator_type={recognize.accelerator_type}) for "
                        f"recognize.lost_timeout_s={timeout:g} s, and none was added (`ray status` and the "
                        "autoscaler's log say why): the documents finished are published; run the job again once "
                        "such nodes are back to read the rest")
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
                return


def check_gpus_for_recognizers(config: JobConfig, gpus: float, mode: Mode = "recognize") -> None:
    """Refuse a local recognizer pool that asks for GPUs the local Ray instance lacks: Ray would wait for them for
    ever, logging that no node fits. Clusters are left alone (an autoscaler may add GPU nodes)."""
    wanted = config.recognize.num_gpus
    if mode == "recognize" and _runs_locally(config) and wanted > gpus:
        raise ConfigError(f"recognize.num_gpus={wanted:g}, but the local Ray instance has {gpus:g} GPU(s): "
                          f"set recognize.num_gpus=0 to read on the CPU, or run on a machine or cluster with GPUs")


def check_accelerator_for_recognizers(config: JobConfig, resources: dict[str, float], mode: Mode = "recognize") -> None:
    """Refuse a local recognizer pool pinned to a GPU type (``recognize.accelerator_type``, e.g. V100 from the cluster
    config) that the local Ray instance's ``resources`` lack: Ray would wait for it for ever, as for a GPU it lacks.
    Clusters are left alone (:func:`_wait_for_a_recognizer_node`: an autoscaler may add the nodes)."""
    wanted = config.recognize.accelerator_type
    if mode != "recognize" or wanted is None or not _runs_locally(config):
        return
    if resources.get(f"accelerator_type:{wanted}", 0.0) <= 0:
        local = sorted(key.partition(":")[2] for key, count in resources.items()
                       if key.startswith("accelerator_type:") and count > 0)
        has = (" has no GPU" if resources.get("GPU", 0.0) <= 0 and not local
               else f"'s GPUs are {', '.join(local) or 'of no known type'}")
        raise ConfigError(f"recognize.accelerator_type={wanted}, but the local Ray instance{has}: set "
                          "recognize.accelerator_type=null (or the type of this machine's GPU), or submit the job "
                          "to a cluster with such GPUs")


def cluster_address(config: JobConfig) -> str | None:
    """The address ``ray.init`` joins: ``ray.address``, or RAY_ADDRESS in place of none or ``auto``."""
    if config.ray.address in (None, "auto"):
        return os.environ.get("RAY_ADDRESS") or None
    return config.ray.address


def check_cluster_address(address: str) -> None:
    """Say in one line what ``ray.init`` would hang on (an address nothing answers at) or print a traceback for (a
    dashboard's http:// address, which the ``ray job`` commands take, in RAY_ADDRESS)."""
    if address.startswith(("http://", "https://")):
        raise ConfigError(f"the Ray address {address} is a dashboard's, which `ray job` commands take: a job joins "
                          "a cluster at its head's host:port (`ray job submit` sets RAY_ADDRESS so), or runs "
                          "locally with no address set")
    if address == "auto":  # the cluster started on this machine; ray.init says when there is none
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"the Ray address {address!r} is not a head's host:port (10.0.0.5:6379), a Ray client's "
                          "ray://host:port, or auto")
    try:  # an IPv6 host is written in brackets, [::1]:6379
        socket.create_connection((host.strip("[]"), int(port)), timeout=CLUSTER_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address} ({exc}): is it running, and is this its "
                          "head's host:port?") from exc


@contextmanager
def ray_session(config: JobConfig, verbose: bool = False) -> Iterator[None]:
    """Join the cluster (``ray job submit`` sets RAY_ADDRESS) or start a private local instance
    (never a stray ``ray start`` cluster found on the machine), and shut down only what this job
    started. Ray's own warnings reach the console only when ``verbose``."""
    if ray.is_initialized():
        yield
        return
    options: dict[str, Any] = {"address": config.ray.address, "include_dashboard": False,
                               "logging_level": logging.WARNING if verbose else logging.ERROR}
    if _runs_locally(config):
        options["address"] = "local"
        options["num_cpus"] = config.ray.num_cpus
        if config.ray.object_store_memory_mb:
            options["object_store_memory"] = config.ray.object_store_memory_mb * 1024 * 1024
    elif address := cluster_address(config):
        check_cluster_address(address)
    sigterm = signal.getsignal(signal.SIGTERM)
    session, ended_well = None, False
    try:
        try:
            ray.init(**options)  # inside: a Ctrl-C while Ray starts still shuts down the processes it started
        except SystemExit as exc:  # what Ray's own SIGTERM handler does while Ray starts
            if exc.code != signal.SIGTERM:
                raise
            raise KeyboardInterrupt(f"signal {signal.SIGTERM}") from exc
        except ConnectionError as exc:  # auto with no cluster here, a Ray client that does not answer
            raise ConfigError(f"cannot join the Ray cluster at {cluster_address(config) or 'auto'}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception when its own processes do not start
            if options["address"] != "local":
                raise
            if "timed out" in str(exc):  # a machine too busy to start Ray in time (it had been blamed on the disk)
                raise PipelineError(f"Ray did not start in time on this machine, which may be busy ({exc}): run "
                                    "again") from exc
            where = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
            raise PipelineError(f"Ray could not start on this machine ({exc}): it keeps its session files in {where} "
                                "(RAY_TMPDIR, else the temporary folder): is there room?") from exc
        if callable(sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)  # Ray's own handler would abort the driver with a stack dump
        if options["address"] == "local" and not verbose:
            session = ray._private.worker._global_node.get_session_dir_path()
        yield
        ended_well = True
    finally:
        gc.collect()  # object refs in cycles are released here, not on another thread during the shutdown
        if options["address"] == "local":
            _stop_autoscaler_monitor()
        ray.shutdown()
    if ended_well and session:
        # a private instance's session folder (its logs), kept where the job failed or was stopped, or is verbose: one
        # was left in /tmp/ray by every run, 35,000 a year from a job every 15 minutes
        _remove_session_folder(session)


def _stop_autoscaler_monitor() -> None:
    """Kill the autoscaler monitor of the private instance this job started, just before ``ray.shutdown``: it has
    nothing to scale on one machine and nothing to save, and Ray stops it only after the GCS, when its SIGTERM handler
    waits on the gone GCS until Ray kills it a second later (1 s of every local job)."""
    node = ray._private.worker._global_node
    for monitor in node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node is not None else []:
        monitor.process.kill()
        monitor.process.wait()


def _remove_session_folder(session: str) -> None:
    """Take out a Ray session folder, and Ray's ``session_latest`` link when it names it."""
    shutil.rmtree(session, ignore_errors=True)
    latest = os.path.join(os.path.dirname(session), "session_latest")
    with suppress(OSError):
        if os.path.realpath(latest) == os.path.realpath(session):
            os.unlink(latest)


class RayTaskExecutor(Executor):
    """Runs what the sink hands it (each document's exports) as Ray tasks of ``options`` (``ray.remote``'s), on any
    node: the output is on storage they all reach. The driver reads on meanwhile; made in it, a searchable PDF/A and
    the METS page images had cost it 1-2 s a page, the whole job's pace on a cluster. A task's own error comes back
    as itself, not wrapped; one whose worker died (out of memory, its node lost) is run once more, then fails. What
    a task logged is logged by whoever takes its result (:class:`_LoggingFuture`)."""

    def __init__(self, **options: Any) -> None:
        self.options = {"max_retries": 1, **options}
        self._tasks: dict[Callable[..., Any], RemoteFunction] = {}

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        if fn not in self._tasks:
            self._tasks[fn] = ray.remote(**self.options)(_keeping_logs(fn))
        done = _LoggingFuture()

        def settle(ran: Future) -> None:
            try:
                result, done.records = ran.result()
            except RayTaskError as error:
                done.set_exception(error.cause)
            except Exception as error:  # noqa: BLE001 - its worker died (out of memory, a node lost): the sink's to say
                done.set_exception(error)
            else:
                done.set_result(result)

        self._tasks[fn].remote(*args, **kwargs).future().add_done_callback(settle)
        return done


class _LoggingFuture(Future):
    """A task's future that logs what the task logged (``records``) when its result is taken: in the driver's
    thread that takes it, where the progress display is drawn, not in Ray's callback thread, whose lines had
    landed in the middle of the live progress line."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def result(self, timeout: float | None = None) -> Any:
        try:
            return super().result(timeout)
        finally:
            records, self.records = self.records, []
            for record in records:
                if (logger := logging.getLogger(record.name)).isEnabledFor(record.levelno):
                    logger.handle(record)


def _keeping_logs(fn: Callable[..., Any]) -> Callable[..., tuple[Any, list[logging.LogRecord]]]:
    """``fn`` returning also what it logged, for the driver to log as its own settings say: this project's lines
    from INFO up, other libraries' from the root's WARNING. A Ray worker's logging has no handler, so this project's
    INFO lines (a PDF whose pages show text already, why PDF/A refused a document's form) went nowhere, and other
    libraries' warnings reached the console through Ray, with its colours and prefix. (An export's error is the
    job's end, a full disk: it says it all.)"""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> tuple[Any, list[logging.LogRecord]]:
        root, ours, kept = logging.getLogger(), logging.getLogger("operators"), queue.SimpleQueue()
        handler, level = QueueHandler(kept), ours.level
        root.addHandler(handler)
        ours.setLevel(logging.INFO)
        try:
            result = fn(*args, **kwargs)
        finally:
            root.removeHandler(handler)
            ours.setLevel(level)
        return result, [kept.get() for _ in range(kept.qsize())]
    return run


def _pack(work: PageWork) -> dict[str, bytes]:
    return {"work": pickle.dumps(work, protocol=5)}


def _unpack(row: dict[str, Any]) -> PageWork:
    return pickle.loads(row["work"])


def _timed(pages: list[PageWork], started: float) -> list[PageWork]:
    """Share the stage time since ``started`` among ``pages`` (``--log-json`` seconds per document)."""
    share = (time.perf_counter() - started) / max(1, len(pages))
    for work in pages:
        work.seconds += share
    return pages


def _rasterize_row(row: dict[str, Any], config: JobConfig) -> list[dict[str, bytes]]:
    task: PageRange = pickle.loads(row["task"])
    started = time.perf_counter()
    return [_pack(work) for work in _timed(rasterize(task, config.rasterize), started)]


def _layout_row(row: dict[str, Any], config: JobConfig, preprocessor: LinePreprocessor | None) -> dict[str, bytes]:
    started = time.perf_counter()
    return _pack(_timed([layout_page(_unpack(row), config, preprocessor)], started)[0])


class _RecognizeBatch:
    """Ray adapter around :class:`operators.recognize.TrOCRRecognizer` (model loaded once).

    torch and transformers are imported here, in the actor, and elsewhere in this module only inside the functions
    that check the model in the driver: the CPU workers that run the other stages import this module and start on
    pages at once instead of spending seconds loading them."""

    def __init__(self, config: JobConfig):
        loaded = _stop_collecting()  # while torch, transformers and the model load; then the actor's objects alone
        try:
            import transformers
            from operators.recognize import TrOCRRecognizer

            transformers.utils.logging.disable_progress_bar()  # a bar in an actor reaches the driver as garbage
            self.recognizer = TrOCRRecognizer(config.recognize)
        finally:
            loaded()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[bytes]]:
        pages = [pickle.loads(item) for item in batch["work"]]
        started = time.perf_counter()
        done = _timed(self.recognizer.recognize_pages(pages), started)
        return {"work": [pickle.dumps(work, protocol=5) for work in done]}


def _triage_all(sources: list[str], settled: list[DocumentPlan | None], config: JobConfig,
                known: dict[str, KnownDocument], on_triaged: Callable[[], None] | None = None) -> list[DocumentPlan]:
    """Triage every file not ``settled`` (its plan taken already: an unchanged local file's document) in parallel as
    plain Ray tasks: cheap, and quicker to start than a dataset. A task that dies (a decoder crashing its worker)
    fails its document, not the job. ``on_triaged`` hears of each file."""
    remote_triage = ray.remote(num_cpus=config.rasterize.num_cpus)(triage)
    plans = list(settled)
    to_read = [index for index, plan in enumerate(plans) if plan is None]
    if on_triaged:
        for _ in range(len(sources) - len(to_read)):
            on_triaged()
    # a window of tasks in flight, not one per file at once: the driver held ~9 KB per file of a large archive
    window = max(TRIAGE_WINDOW_MIN, TRIAGE_WINDOW_PER_CPU * int(ray.cluster_resources().get("CPU", 1)))
    refs: deque[ray.ObjectRef] = deque()
    for position, index in enumerate(to_read):
        while len(refs) < window and position + len(refs) < len(to_read):
            ahead = sources[to_read[position + len(refs)]]
            refs.append(remote_triage.remote(ahead, config.rasterize, known.get(ahead)))
        ref = refs.popleft()
        try:
            plans[index] = ray.get(ref)
        except ray.exceptions.RayError as exc:
            if isinstance(getattr(exc, "cause", None), WriteFailed):  # the job's to stop, not this file's
                raise exc.cause from None
            error = InternalError(f"triage crashed: {type(exc).__name__}: {exc}")
            plans[index] = DocumentPlan(doc_id=source_id(sources[index]), source=recorded_source(sources[index]),
                                        kind=None, num_pages=0, error=error)
        if on_triaged:
            on_triaged()
    return [plan for plan in plans if plan is not None]


def _page_task_cpus(config: JobConfig) -> float:
    """The CPUs of a page task, rasterize and layout run as one (:func:`_page_dataset`), and of an export task."""
    return max(config.rasterize.num_cpus, config.detect.num_cpus)


def _page_task_memory(config: JobConfig) -> int:
    """The memory in bytes a page task and an export task ask Ray for (``detect.memory_mb``)."""
    return config.detect.memory_mb * 1024 * 1024


def _page_dataset(ranges: list[PageRange], config: JobConfig,
                  preprocessor: LinePreprocessor | None) -> ray.data.Dataset:
    """Rasterize -> layout (CPU tasks) -> recognize (actor pool; skipped without a preprocessor)."""
    dataset = ray.data.from_items([{"task": pickle.dumps(r)} for r in ranges], override_num_blocks=len(ranges))
    # The memory request sizes the CPU tasks to a page image; being different from the actor's
    # resources it also stops Ray from fusing layout into the recognizer actor, which would
    # serialize CPU work with the model instead of overlapping them. Rasterize and layout ask for
    # the same resources, so Ray runs them as one task per page range: a page goes on to layout
    # in the process that rendered it, without a round of scheduling in between.
    page_memory = _page_task_memory(config)
    dataset = dataset.flat_map(_rasterize_row, fn_kwargs={"config": config}, num_cpus=config.rasterize.num_cpus,
                               memory=page_memory)
    dataset = dataset.map(_layout_row, fn_kwargs={"config": config, "preprocessor": preprocessor},
                          num_cpus=config.detect.num_cpus, memory=page_memory)
    if preprocessor is None:
        return dataset
    recognize = config.recognize
    pool = (ActorPoolStrategy(min_size=recognize.concurrency[0], max_size=recognize.concurrency[1])
            if isinstance(recognize.concurrency, tuple) else ActorPoolStrategy(size=recognize.concurrency))
    return dataset.map_batches(
        _RecognizeBatch,
        fn_constructor_kwargs={"config": config},
        batch_size=recognize.pages_per_batch,
        compute=pool,
        num_gpus=recognize.num_gpus,
        num_cpus=recognize.num_cpus,
        accelerator_type=recognize.accelerator_type,
    )


def run_job(inputs: list[str], output: str, config: JobConfig, mode: Mode = "recognize",
            progress: JobProgress | None = None, verbose: bool = False) -> JobSummary:
    """Run the whole job; bad documents are recorded as failed rows, never raised. ``progress`` hears of
    every finished page and document; Ray Data's own progress output shows only when ``verbose``."""
    started = time.monotonic()
    found = find_inputs(inputs, output_folders(output), config.rasterize.min_file_age_s)
    selection = config.rasterize.pages
    if mode == "recognize":
        resolve_checkpoint(config.recognize.model)  # a wrong model path fails here, before Ray starts
    with (ThreadPoolExecutor(max_workers=2) as background, output_lock(output), exports_tidied_when_stopped(output),
          input_copies(found.sources), _collections_after_loading() as loaded):
        # the model's preprocessor and generation settings are loaded and checked while Ray starts (loading
        # transformers takes seconds; Ray's start is mostly waiting), and before anything is read or written: a
        # model that cannot be found, has no usable image processor or sets what the fast engine does not
        # implement fails there; its weights load once, in the recognizer actors
        checked_model = background.submit(_line_preprocessor, config, mode)
        # what each documents row names as the model that read it, and its weights' hash (0.1 s for a bundled model,
        # seconds for a large one: beside the check)
        model = recorded_model(config.recognize.model) if mode == "recognize" else None
        hashed = background.submit(weights_sha256, config.recognize.model) if model else None
        published = published_documents(output)  # as recover_output leaves it: tidied once the checks have passed
        known = published.known()
        # the documents of unchanged local files, taken unread (:func:`operators.ingest.unchanged_local_document`)
        settled = [unchanged_local_document(source, known.get(source)) for source in found.sources]
        done_before = _all_done_before(found.sources, settled, output, published, config, mode, model, hashed,
                                       checked_model)
        if done_before is not None:  # nothing to read: no Ray (its start and end had been 7 s of each such run)
            return JobSummary(output=output, documents_skipped=len(done_before), written=WriteSummary(),
                              seconds=time.monotonic() - started, left_out=dict(found.left_out),
                              failed_earlier=_failed_earlier(done_before, [], published), recent=len(found.recent),
                              min_file_age_s=config.rasterize.min_file_age_s)
        if progress:  # not before: a run refused by the checks above had said it was starting Ray
            progress.begin()
        with ray_session(config, verbose):
            preprocessor = checked_model.result()
            loaded()  # torch, transformers and Ray
            model_sha256 = hashed.result() if hashed else None
            resources = ray.cluster_resources()
            check_recognizer_resources(config, resources, mode)
            recover_output(output, published)
            sink = ParquetSink(output, config.output.parquet_rows_per_file, config.output.exports, config.output.pdfa,
                               listener=progress.document_done if progress else None,
                               on_published=progress.document_published if progress else None,
                               publish_every_s=config.output.publish_every_s, rasterize=config.rasterize,
                               # an export renders pages as a page task does, and gets what one gets: the CPUs a
                               # local run keeps from the recognizers for them (check_cpus_left_for_pages)
                               exporter=RayTaskExecutor(num_cpus=_page_task_cpus(config),
                                                        memory=_page_task_memory(config)),
                               exports_in_flight=max(2, int(EXPORTS_IN_FLIGHT_PER_CPU * resources.get("CPU", 0.0))))
            quiet_ray_data(verbose)
            if progress:
                progress.triage_started(len(found.sources))
            plans = _triage_all(found.sources, settled, config, known, progress.file_triaged if progress else None)
            retirement = _check_against_output(plans, published, output, config, mode, model, model_sha256)
            retire_documents(output, retirement)
            done = {doc_id: source for doc_id, source in published.sources().items()
                    if doc_id not in retirement.doc_ids}
            marked = mark_duplicates(plans, done)
            fresh, unselected = _with_selected_pages(marked, selection)
            skipped = len(plans) - len(fresh) - unselected  # already in the output
            _warn_of_documents_without_exports(plans, published, done, output, config.output.exports)
            _warn_of_files_read_again(marked, published, done, output, selection)
            readable = [plan for plan in fresh if plan.duplicate_of is None and plan.error is None]
            if progress:
                progress.start(len(fresh), sum(len(selected_pages(selection, plan.num_pages)) for plan in readable))
            for plan in fresh:
                sink.expect(_document_record(plan, selection, mode, model, model_sha256),
                            len(selected_pages(selection, plan.num_pages)))
            ranges = page_ranges(readable, config.rasterize.pages_per_task, selection)
            if ranges:
                if mode == "recognize" and not _runs_locally(config):
                    _wait_for_a_recognizer_node(config)
                with (_batches_of(_page_dataset(ranges, config, preprocessor)) as batches,
                      RecognizerNodesWatch(config, mode) as watch):
                    try:
                        for batch in batches:
                            for item in batch["work"]:
                                work = pickle.loads(item)
                                if work.error_code == WriteFailed.error_code:  # the job's to stop (:func:`rasterize`)
                                    raise WriteFailed(work.error_message)
                                if progress:
                                    progress.page_done(work)
                                sink.add_page(work)
                        # the pages are read: the GPU nodes may go (an autoscaler takes idle ones back) while the
                        # last exports are written, which had stopped a finished job as RecognizersLost
                        watch.stop()
                        sink.finish_exports()  # as stoppable
                    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: what is finished is kept, published
                        sink.collect_exports()  # those whose exports were written meanwhile too
                        sink.flush()  # first: `ray job stop` kills the driver a few seconds after its SIGTERM
                        if watch.lost is not None:  # the recognizer nodes gone: the same, with its reason
                            raise watch.lost from None
                        raise
            written = sink.close()  # while Ray runs: it waits for the documents' export tasks
    return JobSummary(output=output, documents_skipped=skipped, written=written,
                      seconds=time.monotonic() - started, left_out=dict(found.left_out),
                      retried=len(retirement.failed), unselected=unselected,
                      failed_earlier=_failed_earlier(plans, marked, published), recent=len(found.recent),
                      min_file_age_s=config.rasterize.min_file_age_s)


def _all_done_before(sources: list[str], settled: list[DocumentPlan | None], output: str,
                     published: PublishedDocuments, config: JobConfig, mode: Mode, model: str | None,
                     hashed: Future | None, checked_model: Future) -> list[DocumentPlan] | None:
    """The plans of ``sources`` when a local run has nothing to read: each a local file unchanged since its document
    was written well (``settled``), or read before under its name with the bytes it holds now (hashed here: a touched
    file, a file that failed), no copy of a document among them, and the output takes none out
    (:func:`_check_against_output`): a hot folder's run with nothing new. None for a run with something to read, or
    with an object store size to try on Ray's start. Such a run is refused as one with something to read would be, in
    the same order (the model, then the resources Ray's local instance would have), and tidies a killed run's
    leftovers where that run does: the output is read as :func:`recover_output` would leave it (``published``)."""
    if not _runs_locally(config) or config.ray.object_store_memory_mb is not None:
        return None
    read_before = {row["source"] for row in published.rows}
    plans = list(settled)
    if any(plan is None and source not in read_before for plan, source in zip(plans, sources)):
        return None  # a new file: nothing hashed
    # a failed document's page count is triage's as it failed (none where it failed before counting): one read with
    # other pages is left to triage, for the refusal of a run that selects pages its reading did not
    num_pages = {row["doc_id"]: row["num_pages"] for row in published.rows
                 if row["status"] != "failed" or row["pages_selected"] == config.rasterize.pages}
    for index, source in enumerate(sources):
        if plans[index] is None:  # a file touched, or one that failed: its bytes tell
            if (plan := local_document_of_bytes(source, num_pages)) is None:
                return None
            plans[index] = plan
    checked_model.result()
    check_recognizer_resources(config, local_ray_resources(config), mode)
    recover_output(output, published)  # where the run with Ray tidies too: before it compares with the output
    model_sha256 = hashed.result() if hashed else None
    if _check_against_output(plans, published, output, config, mode, model, model_sha256).doc_ids:
        return None
    if mark_duplicates(plans, published.sources()):  # a file now holding another document's bytes: a duplicate row
        return None
    _warn_of_documents_without_exports(plans, published, published.sources(), output, config.output.exports)
    return plans


def local_ray_resources(config: JobConfig) -> dict[str, float]:
    """The resources of the private local Ray instance a run of ``config`` starts, found as ``ray.init`` finds them
    (a container's CPU quota, the GPUs visible and their type), without starting it."""
    return ResourceAndLabelSpec(num_cpus=config.ray.num_cpus).resolve(is_head=True).to_resource_dict()


def check_recognizer_resources(config: JobConfig, resources: dict[str, float], mode: Mode = "recognize") -> None:
    """What a local run refuses of its recognizers' CPUs, GPUs and GPU type, given the local Ray instance's
    ``resources`` (clusters are left alone)."""
    check_cpus_left_for_pages(config, resources.get("CPU", 0.0), mode)
    check_gpus_for_recognizers(config, resources.get("GPU", 0.0), mode)
    check_accelerator_for_recognizers(config, resources, mode)


def _stop_collecting() -> Callable[[], None]:
    """Garbage collection off while a process loads torch, transformers, Ray or a model (each collection a pass over
    all loaded so far); what this returns, called once they are loaded, freezes them (``gc.freeze``: later
    collections leave them out) and turns collection back on."""
    enabled = gc.isenabled()
    gc.disable()

    def loaded() -> None:
        gc.freeze()
        if enabled:
            gc.enable()

    return loaded


@contextmanager
def _collections_after_loading() -> Iterator[Callable[[], None]]:
    """:func:`_stop_collecting` for the driver, whose libraries (Ray starting, torch and transformers for the model
    check) then stay out of the full collection before Ray's shutdown (:func:`ray_session`, 0.6 s) and of those Ray
    Data's start had set off (0.5 s). All back as it was at the end, for a process that goes on."""
    enabled = gc.isenabled()
    try:
        yield _stop_collecting()
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


@contextmanager
def _batches_of(dataset: ray.data.Dataset) -> Iterator[Iterator[dict[str, Any]]]:
    """The dataset's batches, streamed. When the driver stops reading early (a write failed), the
    iteration is closed and the threads Ray Data started for it get a moment to leave their Ray calls
    before Ray shuts down: Ray joins neither its ``iter_threaded`` block fetchers nor its prefetcher
    (never stopped on an early exit; it parks), and a thread inside a Ray call during
    ``ray.shutdown()`` makes Ray end the driver with exit status 1 before the job's error is printed."""
    before = set(threading.enumerate())
    batches: Generator[dict[str, Any], None, None] = iter(dataset.iter_batches(batch_size=None))
    try:
        yield batches
    except BaseException:
        _stop_early(batches, before)
        raise


def _stop_early(batches: Generator[dict[str, Any], None, None], before: set[threading.Thread]) -> None:
    """Close the iteration and wait for its threads; nothing here may hide the error that stopped it."""
    try:
        batches.close()
    except Exception:  # noqa: BLE001 - the error that stopped the job is the one to report
        log.debug("closing the dataset iteration failed", exc_info=True)
    deadline = time.monotonic() + DATASET_THREADS_GRACE_S
    for thread in set(threading.enumerate()) - before:
        try:
            thread.join(max(0.0, deadline - time.monotonic()))
        except (RuntimeError, AssertionError):  # not started yet, or a foreign thread Python cannot join
            continue


def _line_preprocessor(config: JobConfig, mode: Mode) -> LinePreprocessor | None:
    """The checkpoint's line preprocessing (recognize mode), which also checks the model (its tokenizer,
    :func:`operators.model.check_tokenizer`, and for the fast engine its decoder and generation settings,
    :func:`operators.decoding.check_generation_settings`), and on a local
    run without a GPU the precision on this CPU (its recognizers would refuse it only once started; on
    a GPU the actors check it, so the driver never opens a CUDA context). Imported here: the driver
    loads transformers only when it needs them, in parallel with Ray's start."""
    if mode != "recognize":
        return None
    from operators.decoding import check_generation_settings
    from operators.model import check_tokenizer, load_line_preprocessor, resolve_device, resolve_precision

    if _runs_locally(config) and (device := resolve_device(config.recognize.device)).type == "cpu":
        resolve_precision(config.recognize.precision, device)
    preprocessor = load_line_preprocessor(config.recognize.model)
    check_tokenizer(config.recognize.model)
    if config.recognize.engine == "fast":
        check_generation_settings(config.recognize.model)
    return preprocessor


def _selects_no_page(plan: DocumentPlan, selection: str | None) -> bool:
    """A readable document none of whose pages ``selection`` picks (``--pages 5-`` over a 2-page letter)."""
    return (selection is not None and plan.error is None and plan.duplicate_of is None
            and not selected_pages(selection, plan.num_pages))


def _with_selected_pages(plans: list[DocumentPlan], selection: str | None) -> tuple[list[DocumentPlan], int]:
    """The plans to write, and how many are left out for having no page in ``selection``
    (:func:`_selects_no_page`), with their duplicates: written as done with 0 pages, they had kept a later run with
    other pages from the output for good (:func:`check_earlier_readings`). Left unwritten, a later run reads them."""
    empty = {plan.doc_id for plan in plans if _selects_no_page(plan, selection)}
    kept = [plan for plan in plans if plan.doc_id not in empty and plan.duplicate_of not in empty]
    if empty:
        first = next(plan for plan in plans if plan.doc_id in empty)
        log.warning("%s no page in --pages %s (%s has %d), and %s not written: a run with other pages can read "
                    "%s", "1 document has" if len(empty) == 1 else f"{len(empty)} documents have", selection,
                    first.source, first.num_pages, "is" if len(empty) == 1 else "are",
                    "it" if len(empty) == 1 else "them")
    return kept, len(plans) - len(kept)


def _document_record(plan: DocumentPlan, selection: str | None, mode: Mode, model: str | None,
                     model_sha256: str | None) -> DocumentRecord:
    error = plan.error
    status = "duplicate" if plan.duplicate_of else "failed" if error else "ok"
    if status != "ok":  # no model reads a file that failed triage, nor a duplicate (its original's row tells)
        model = model_sha256 = None
    return DocumentRecord(
        doc_id=plan.doc_id, source=plan.source, status=status,
        error_code=error.error_code if error else None, error_message=str(error) if error else None,
        num_pages=plan.num_pages, repaired=plan.repaired, duplicate_of=plan.duplicate_of, pages_selected=selection,
        mode=mode, source_size=plan.stamp[0] if plan.stamp else None,
        source_mtime_ns=plan.stamp[1] if plan.stamp else None, model=model, model_sha256=model_sha256,
    )


def _check_against_output(plans: list[DocumentPlan], published: PublishedDocuments, output: str, config: JobConfig,
                          mode: Mode, model: str | None, model_sha256: str | None) -> Retirement:
    """The failed documents the run takes out of the output to read them again (all of its sources' with
    ``--retry-failed``, else those whose failure says nothing of the bytes their file holds:
    :meth:`operators.write.PublishedDocuments.failed_to_retry`),
    once the run is known not to skip documents read otherwise (:func:`check_earlier_readings`); the run and the dry
    run alike."""
    retirement = published.failed_to_retry({recorded_source(plan.source): plan.doc_id for plan in plans},
                                           every=config.output.retry_failed)
    check_earlier_readings(plans, published, output, config.rasterize.pages, mode, model, model_sha256,
                           retirement.doc_ids)
    return retirement


def check_earlier_readings(plans: list[DocumentPlan], published: PublishedDocuments, output: str,
                           selection: str | None, mode: Mode, model: str | None, model_sha256: str | None,
                           retried: Collection[str] = ()) -> None:
    """Refuse a run that would skip documents the output holds read otherwise: a run skips what is already
    written, so what the earlier run left undone would never be done.

    - With pages (``--pages``) the earlier reading did not read. Selections are compared by the pages they pick from
      each document ("1-" and none, "1-3" and "1,2,3" are the same; a one-page document read whole lacks nothing
      that ``--pages 2`` picks); rows written before the selection was recorded count as every page.
    - In the other mode: a ``run`` into a ``detect`` output would leave their lines without text for good, and a
      ``detect`` into a ``run`` output would say done of work it does not do. Rows written before the mode was
      recorded are not checked.
    - By another model: the output would hold them as the other one read them. Models are the same by their weights
      where both were hashed (a copy of the model elsewhere is the same, a folder trained again in place is not),
      else by name (:func:`operators.checkpoint.recorded_model`). Rows written before the model was recorded are not
      checked.

    Documents ``retried`` are read again."""
    earlier = published.readings()
    # one plan per document: a copy given in this run has its original's doc_id until duplicates are marked
    firsts: dict[str, DocumentPlan] = {}
    for plan in plans:
        if plan.doc_id in earlier and plan.doc_id not in retried:
            firsts.setdefault(plan.doc_id, plan)
    again = list(firsts.values())
    # pages this run selects that the earlier reading did not read (one that read more lost nothing)
    other_pages = [plan for plan in again if set(selected_pages(selection, plan.num_pages))
                   - set(selected_pages(earlier[plan.doc_id].pages_selected, plan.num_pages))]
    if other_pages:
        def described(pages: str | None) -> str:
            return "every page" if pages is None else f"pages {pages}"

        raise ConfigError(
            f"{_of_these(len(other_pages))} in {output} read with "
            f"{described(earlier[other_pages[0].doc_id].pages_selected)} ({other_pages[0].source}), and this run "
            f"selects {described(selection)}: a run skips documents already written, so those pages would never be "
            f"read; run with the same --pages, or write to another output")
    other_mode = [plan for plan in again if earlier[plan.doc_id].mode not in (None, mode)]
    if other_mode:
        command = {"recognize": "run", "detect": "detect"}
        raise ConfigError(
            f"{_of_these(len(other_mode))} in {output} from `trocr-pipeline "
            f"{command[earlier[other_mode[0].doc_id].mode]}` ({other_mode[0].source}), and this is `trocr-pipeline "
            f"{command[mode]}`: a run skips documents already written, so this command would never read "
            f"{'it' if len(other_mode) == 1 else 'them'}; write to another output")
    other_model = [plan for plan in again if model and earlier[plan.doc_id].model is not None
                   and not _same_model(earlier[plan.doc_id], model, model_sha256)]
    if other_model:
        first = earlier[other_model[0].doc_id]
        raise ConfigError(
            f"{_of_these(len(other_model))} in {output} read by the model "
            f"{model_named(first.model, first.model_sha256)} ({other_model[0].source}), and this run reads with "
            f"{model_named(model, model_sha256)}: a run skips documents already written, so this model would never "
            f"read {'it' if len(other_model) == 1 else 'them'}; write to another output")


def _warn_of_documents_without_exports(plans: list[DocumentPlan], published: PublishedDocuments,
                                       done: Collection[str], output: str, exports: Sequence[str]) -> None:
    """Warn of the documents this run skips (already written) without the exports it asks for: exports are written
    when a document is read, so a run that asks for them later does not write them; the run and the dry run alike."""
    unexported = published.lacking_exports({plan.doc_id for plan in plans} & set(done), exports) if exports else []
    if unexported:
        one = len(unexported) == 1
        log.warning("%s already in %s without all the exports this run asks for (%s), and not read again: "
                    "exports are written when a document is read (write to a new output to export %s)",
                    "1 document is" if one else f"{len(unexported)} documents are", output,
                    unexported[0] if one else f"{unexported[0]}, first", "it" if one else "them all")


def _warn_of_files_read_again(fresh: list[DocumentPlan], published: PublishedDocuments, done: Collection[str],
                              output: str, selection: str | None) -> None:
    """Warn of the files this run reads (``fresh``: its plans not already done, duplicates marked) that the output
    holds a reading of, made from other bytes (a scan replaced under its name): each reading is a document of its own,
    so both are kept, under the same source, and no run had said so; the run and the dry run alike."""
    read = published.read_sources(done)
    again = [plan for plan in fresh if plan.error is None and plan.duplicate_of is None
             and recorded_source(plan.source) in read and selected_pages(selection, plan.num_pages)]
    if again:
        one = len(again) == 1
        log.warning("%s read into %s before, from other bytes (%s%s): %s read as %s, and the earlier %s kept "
                    "beside %s under the same source (show tells them apart)",
                    "1 file was" if one else f"{len(again)} files were", output, again[0].source, "" if one else ", first",
                    "it is" if one else "they are", "a new document" if one else "new documents",
                    "reading is" if one else "readings are", "it" if one else "them")


def _failed_documents(count: int) -> str:
    return f"{count} failed document{'' if count == 1 else 's'}"


def _of_these(count: int) -> str:
    return f"{count} of these documents {'is' if count == 1 else 'are'}"


def _same_model(earlier: Reading, model: str, model_sha256: str | None) -> bool:
    """Whether the model of an earlier reading is this run's: by their weights where both were hashed, else by
    name."""
    if earlier.model_sha256 and model_sha256:
        return earlier.model_sha256 == model_sha256
    return earlier.model == model


@dataclass(frozen=True)
class DryRun:
    """What a run would do: every document's triage, nothing rendered or written."""

    plans: list[DocumentPlan]  # duplicates marked as a run marks them
    done: dict[str, str]  # doc_ids already in the output (and their sources), which a run skips
    pages: str | None  # rasterize.pages
    mode: Mode = "recognize"
    retried: int = 0  # failed documents a run takes out to read their files again (:func:`_check_against_output`)
    failed_earlier: int = 0  # of those already done, the ones the output holds as failed
    left_out: dict[str, int] = field(default_factory=dict)  # files in folders and globs that are no documents
    output: str = "DIR"  # as given, for the commands the description names
    recent: list[str] = field(default_factory=list)  # files modified too lately to read, left for a later run
    min_file_age_s: float = 0.0

    def describe(self) -> str:
        # where each duplicate's pages come from: the output's copy, else this run's first one
        firsts = {plan.doc_id: plan.source for plan in reversed(self.plans) if plan.duplicate_of is None}
        now_read = {plan.source: plan.doc_id for plan in self.plans}
        unreadable = {plan.source for plan in self.plans if plan.error is not None}

        def owner(doc_id: str) -> str:
            if doc_id not in self.done:
                return firsts.get(doc_id, doc_id)
            # the file an earlier run read may hold other bytes now, or be gone: a duplicate named as "same bytes as"
            # it had sent an operator to a file that no longer holds them (looked at for duplicates alone: an
            # output holds millions of documents)
            source = self.done[doc_id]
            since = (", which cannot be read now" if source in unreadable
                     else ", which now holds other bytes" if now_read.get(source, doc_id) != doc_id
                     else ", which is not found here" if not is_uri(source) and not os.path.exists(source) else "")
            return f"the document read earlier from {source}{since}"
        lines, todo_pages, todo_documents, failing, duplicates, unselected = [], 0, 0, 0, 0, 0
        for plan in self.plans:
            if plan.doc_id in self.done:  # counted, not listed: a growing archive's new files had been lost among them
                continue
            selected = len(selected_pages(self.pages, plan.num_pages))
            oversized = _oversized_selected(plan, self.pages)
            if plan.duplicate_of is not None:
                state, selected, duplicates = "duplicate", 0, duplicates + 1
            elif plan.error is not None or (oversized and len(oversized) == selected):
                state, failing = "failed", failing + 1
            elif _selects_no_page(plan, self.pages):  # not written (:func:`_with_selected_pages`)
                state, unselected = "no pages", unselected + 1
            else:
                state, todo_pages, todo_documents = "ok", todo_pages + selected - len(oversized), todo_documents + 1
            if state == "duplicate":
                reason = f" (same bytes as {owner(plan.duplicate_of)})"
            elif plan.error is not None:
                reason = f" ({plan.error.error_code}: {plan.error})"
            elif oversized:
                will_fail = f"{len(oversized)} page(s) will fail, " if state == "ok" else ""
                reason = f" ({will_fail}page_too_large: {oversized[0]})"
            else:
                reason = ""
            lines.append(f"{state:9} {selected:4} pages  {plan.source}{reason}")
        skipped = sum(plan.doc_id in self.done for plan in self.plans)
        retry = f", {_failed_documents(self.retried)} to take out and read again" if self.retried else ""
        lines.append(f"documents: {len(self.plans)} found, {todo_documents} to process, {failing} failing, "
                     f"{duplicates} duplicates, {skipped} already done"
                     f"{_failed_earlier_note(self.failed_earlier, self.output)}{retry}"
                     f"{f', {unselected} without a page in --pages' if unselected else ''}")
        lines.append(_left_out_line(self.left_out))
        lines.extend(f"{'recent':9}    - pages  {source}" for source in self.recent)
        if self.recent:
            lines.append(_recent_line(len(self.recent), self.min_file_age_s))
        stages = "rasterize, detect and recognize" if self.mode == "recognize" else "rasterize and detect"
        lines.append(f"work: {todo_pages} pages to {stages}; nothing written (dry run)")
        return "\n".join(lines)

    @property
    def failing(self) -> bool:
        """Whether the run would exit 4: a document fails triage, has a page over the pixel limit, or is done as
        failed."""
        return bool(self.failed_earlier) or any(
            (plan.error is not None or _oversized_selected(plan, self.pages)) and plan.doc_id not in self.done
            and plan.duplicate_of is None for plan in self.plans)


def _oversized_selected(plan: DocumentPlan, pages: str | None) -> list[str]:
    """Why each selected page of ``plan`` over the pixel limit fails unrendered (the document with it)."""
    selected = set(selected_pages(pages, plan.num_pages))
    return [why for number, why in plan.oversized_pages if number in selected]


def dry_run(inputs: list[str], output: str, config: JobConfig, mode: Mode = "recognize") -> DryRun:
    """Triage every input (in threads: hashing and poppler release the GIL) and check the model, as
    :func:`run_job` would before any work; starts no Ray and writes nothing."""
    found = find_inputs(inputs, output_folders(output), config.rasterize.min_file_age_s)
    sources = found.sources
    check_output_writable(output)
    check_output_is_ours(output)
    _line_preprocessor(config, mode)
    check_recognizer_resources(config, local_ray_resources(config), mode)
    published = published_documents(output)
    known = published.known()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        plans = list(pool.map(lambda source: triage(source, config.rasterize, known.get(source)), sources))
    model = recorded_model(config.recognize.model) if mode == "recognize" else None
    model_sha256 = weights_sha256(config.recognize.model) if model else None
    retirement = _check_against_output(plans, published, output, config, mode, model, model_sha256)
    done = {doc_id: source for doc_id, source in published.sources().items() if doc_id not in retirement.doc_ids}
    _warn_of_documents_without_exports(plans, published, done, output, config.output.exports)
    fresh = mark_duplicates(plans, done)  # all but the ones already done
    _warn_of_files_read_again(fresh, published, done, output, config.rasterize.pages)
    marked = {plan.source: plan for plan in fresh}
    return DryRun([marked.get(plan.source, plan) for plan in plans], done, config.rasterize.pages, mode,
                  len(retirement.failed), _failed_earlier(plans, fresh, published), dict(found.left_out), output,
                  found.recent, config.rasterize.min_file_age_s)
