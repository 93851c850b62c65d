"""The ``fastattr`` command line (also ``python -m fastattr``).

Exit status: 0 success; 1 a check failed (``verify`` finding a problem, ``audit`` a violated
threshold) or an unexpected exception, printed with its traceback since it is a bug (in fastattr or
in the model or data code it ran); 2 a deliberate fastattr error (every ``FastattrError``: bad input,
an unusable run directory, a failed peer...) or a bad argument, printed as one line (``--debug``
shows its traceback too).

The package: ``parser`` (every subcommand's flags and value types), ``commands`` (``demo``, ``run``),
``reports`` (``info``, ``verify``, ``layers``, ``render``, ``audit``); here ``main`` and the exit paths.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback

from ..errors import FastattrError, OptionError
from .parser import build_parser
from .reports import printable

logger = logging.getLogger("fastattr")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.command in ("run", "audit") and args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if getattr(args, "device", None) is not None:
        try:
            _check_device(args.device)
        except OptionError as exc:  # before any model is loaded: one line, exit 2
            print(f"fastattr: error: {exc}", file=sys.stderr)
            return 2
    if args.command == "run" and "LOCAL_RANK" in os.environ and args.device.startswith("cuda"):
        import torch

        from ..distributed import local_device

        args.device = str(local_device(torch.device(args.device)))  # torchrun: one GPU per rank, loaded there
    from ..interrupts import exit_code, two_stage_interrupts

    saving = args.command in ("run", "demo")  # commands that write shards
    first = "fastattr: interrupted: " + ("saving the shard in progress, then stopping" if saving else "stopping") + " (Ctrl-C again quits at once)"
    again = "fastattr: interrupted again: quitting now" + (" (finished shards are kept; rerun to resume)" if saving else "")
    try:
        with two_stage_interrupts(first, again):  # a second Ctrl-C exits at once, never hangs (fastattr/interrupts.py)
            return args.func(args)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (interrupts.Terminated: exit 143)
        print("fastattr: interrupted (finished shards are kept; rerun to resume)", file=sys.stderr)
        return exit_code(exc)
    except BrokenPipeError:  # `fastattr info run | head`: the reader left; not an error of ours
        # Python flushes stdout again at exit and would report the broken pipe: point it at devnull.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by it
    except FastattrError as exc:  # a deliberate error: one line that says what to do
        _record_for_torchrun(exc)
        if args.debug:
            raise
        text = _flag_words(str(exc)) if args.command == "run" else str(exc)
        print("\n".join(printable(line) for line in f"fastattr: error{_rank()}: {text}".split("\n")), file=sys.stderr)  # may quote a manifest
        return 2
    except Exception as exc:  # anything else is a bug (here or in the model/data code): keep the traceback
        _record_for_torchrun(exc)
        traceback.print_exc()
        print(f"fastattr: unexpected {type(exc).__name__}{_rank()} (traceback above; not a fastattr input error)", file=sys.stderr)
        return 1


def _check_device(name: str) -> None:
    """--device names a device this machine has (a CPU-only torch given --device cuda fails with an
    AssertionError deep in the model's .to(), and a typo with torch's RuntimeError)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise OptionError(f"--device {name} is not a torch device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"--device {name}: no CUDA device is available to this torch ({torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"--device {name}: MPS is not available here; use --device cpu")


# keyword arguments that library errors name, and the flags a command-line user types instead
_FLAG_WORDS = {"pass overwrite=True": "pass --overwrite", "pass allow_nonfinite=True to proceed": "pass --allow-nonfinite to proceed",
               "train_mode=True cannot": "--train-mode cannot", "this method needs layer=:": "this method needs --layer NAME:"}  # fmt: skip


def _flag_words(text: str) -> str:
    for words, flag in _FLAG_WORDS.items():
        text = text.replace(words, flag)
    return text


def _rank() -> str:
    """Under torchrun, which rank speaks."""
    return f" (rank {os.environ.get('RANK')})" if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else ""


def _record_for_torchrun(exc: BaseException) -> None:
    """Under torchrun, write the error where its agent looks (torch.distributed.elastic's error
    file, as its @record decorator does), so the job's failure report shows this rank's error."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        from ..errors import PeerFailedError

        get_error_handler().record_exception(exc)
        if isinstance(exc, PeerFailedError):
            # The report's root cause is the smallest timestamp in whole seconds, ties going to the
            # lowest rank: a rank stopped by another's failure would often be named instead of it.
            path = os.environ["TORCHELASTIC_ERROR_FILE"]
            with open(path) as fp:
                data = json.load(fp)
            data["message"]["extraInfo"]["timestamp"] = str(int(data["message"]["extraInfo"]["timestamp"]) + 1)
            with open(path, "w") as fp:
                json.dump(data, fp)
    except Exception as record_exc:  # reporting must never hide the error itself
        logger.debug("could not record the error for torchrun: %s", record_exc)
