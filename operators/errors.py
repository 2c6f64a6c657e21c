"""One exception hierarchy for the whole pipeline (OCRmyPDF style: each error carries its exit code).

Every error carries the process exit code the CLI returns for it and, for errors that belong to a
single document or page, the stable ``error_code`` written to the ``documents`` / ``pages`` tables.
Page failures that are recorded on the page rather than raised use the plain codes at the end.
The set of error codes is documented in the README; add new ones there too.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    ok = 0
    other_error = 1
    bad_args = 2
    input_file = 3
    documents_failed = 4
    model_error = 5
    output_locked = 6
    write_failed = 7
    ctrl_c = 130


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""

    exit_code: ExitCode = ExitCode.other_error
    error_code: str = "internal_error"


class ConfigError(PipelineError):
    """The configuration or the command line is wrong."""

    exit_code = ExitCode.bad_args
    error_code = "bad_config"


class ModelLoadError(PipelineError):
    """The recognition model cannot be loaded: fail at start-up, never write empty output."""

    exit_code = ExitCode.model_error
    error_code = "model_error"


class OutputNotWritable(ConfigError):
    """The output location cannot be created or written: found before any work."""

    error_code = "output_not_writable"


class OutputLocked(PipelineError):
    """Another run holds the output folder's lock: two runs must never write one output."""

    exit_code = ExitCode.output_locked
    error_code = "output_locked"


class WriteFailed(PipelineError):
    """Writing the output failed mid-job (disk full, I/O error); what was published stays valid."""

    exit_code = ExitCode.write_failed
    error_code = "write_failed"


class RecognizersLost(PipelineError):
    """A cluster had no node that can run a recognizer actor for ``recognize.lost_timeout_s`` mid-job (GPU nodes
    lost, none added): Ray Data would wait for one for ever. What was published stays; a rerun does the rest."""

    error_code = "recognizers_lost"


class NoInputError(PipelineError):
    """The inputs named on the command line match no file."""

    exit_code = ExitCode.input_file
    error_code = "no_input"


class DocumentError(PipelineError):
    """Something is wrong with one input file; that document fails, the job goes on."""

    exit_code = ExitCode.documents_failed
    error_code = "document_error"


class UnreadableFile(DocumentError):
    """The file cannot be opened or read (missing, permissions, I/O error)."""

    error_code = "unreadable"


class EmptyFile(DocumentError):
    """The file has zero bytes."""

    error_code = "empty_file"


class UnsupportedFormat(DocumentError):
    """The bytes are not a PDF, TIFF, PNG, JPEG, JPEG 2000, BMP, WebP or GIF, whatever the file name says."""

    error_code = "unsupported_format"


class CorruptFile(DocumentError):
    """The file is damaged beyond repair (truncated, broken structure)."""

    error_code = "corrupt_file"


class EncryptedFile(DocumentError):
    """The PDF needs a user password to open."""

    error_code = "encrypted"


class PageTooLarge(DocumentError):
    """A page would exceed the configured pixel limit, or the image is a decompression bomb."""

    error_code = "page_too_large"


class RenderTimeout(DocumentError):
    """poppler did not answer within the configured timeout; it was killed."""

    error_code = "render_timeout"


class RenderFailed(DocumentError):
    """poppler or the image decoder failed on a page."""

    error_code = "render_failed"


class SourceChanged(DocumentError):
    """The file changed (its size or modification time) after triage: its pages would not be the bytes its
    doc_id names."""

    error_code = "source_changed"


class NoPages(DocumentError):
    """The file holds no page (a PDF whose page tree is empty)."""

    error_code = "no_pages"


class InternalError(DocumentError):
    """An unforeseen error on this file (a library fault or a bug); the message names the exception."""

    error_code = "internal_error"


#: Codes of page failures that are recorded on the page (``PageWork.fail``), never raised.
PAGE_COUNT_MISMATCH = "page_count_mismatch"  # fewer pages rendered than the file declares
DETECTION_FAILED = "detection_failed"  # line detection failed on a page
RECOGNITION_FAILED = "recognition_failed"  # the model failed on this page's lines: an error, or no memory for a line alone
EXPORT_FAILED = "export_failed"  # the document's export files could not be made (its tables are written)
