"""Serve a trained or exported model over HTTP, with a page to try it.

Examples:
  python scripts/serve.py runs/quick/final_model                       # http://127.0.0.1:8000/
  python scripts/serve.py runs/quick/onnx-int8 --port 8080             # an exported model (scripts/export.py)
  curl -s localhost:8000/answer -d '{"question": "Who wrote it?", "context": "It was written by Ann Lee."}'

Needs the serve extra: pip install -e ".[serve]". Endpoints:
  GET  /          a page: paste a passage, ask, see the answer highlighted with its probability and candidates
  POST /answer    one {"question", "context"[, "id"]} object or a list of them; ?top_k=N adds N candidates each.
                  Returns what predict.py prints (an object or a list to match). Errors are {"error": ...}:
                  400 malformed JSON, 413 body too large, 422 a bad field or limit (named), 408 a body that does
                  not arrive, 503 busy, 504 too slow.
  GET  /health    the model, its backend (torch-fp32, torch-bf16, onnx-fp32, onnx-int8), how it answers (v2,
                  threshold, settings from bertqa.json or defaults), untrained_head (why its QA head looks never
                  trained, else null), version and limits
  GET  /openapi.json  the API's OpenAPI description

Any transformers question-answering model serves too (a folder saved by plain transformers, or a hub id): it
answers as a SQuAD 1.1 model unless --v2 or --threshold says otherwise.

Questions that arrive together are answered in one batch (up to --max-batch questions, waiting at most
--max-wait-ms for more). It listens on 127.0.0.1 unless --host says otherwise; it has no authentication, so do not
expose it beyond machines you trust.
"""

from __future__ import annotations

import argparse
import logging

from bertqa.cli import (
    non_negative_float,
    port_number,
    positive_float,
    positive_int,
    run,
    script_parser,
    setup_logging,
)

logger = logging.getLogger("bertqa")


# (flag, ServiceLimits field, type, help): the service's limits, each a flag.
LIMIT_FLAGS = (
    ("--max-batch", "max_batch", positive_int, "questions answered together"),
    ("--max-wait-ms", "max_wait_ms", non_negative_float, "how long a batch waits for more questions"),
    ("--timeout", "timeout_s", positive_float, "seconds before a request is cut off with a 504"),
    ("--max-questions", "max_questions", positive_int, "questions per request"),
    ("--max-context-chars", "max_context_chars", positive_int, "characters per passage"),
    ("--max-body-bytes", "max_body_bytes", positive_int, "bytes per request body"),
    ("--max-request-chars", "max_request_chars", positive_int, "characters of all questions and passages a request"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bertqa.deploy.service import ServiceLimits

    d = ServiceLimits()
    parser = script_parser(__doc__)
    parser.add_argument(
        "model",
        help="saved model folder, a LoRA run's adapter/ folder, one scripts/export.py wrote, or any transformers "
        "QA model (a folder saved by plain transformers, a hub id)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)"
    )
    parser.add_argument("--port", type=port_number, default=8000, help="port (default: %(default)s)")
    parser.add_version(threshold_default="the one saved with a v2 model, else 0 with --v2")
    parser.add_precision(help="PyTorch models: auto = bf16 where native")
    parser.add_base_model()
    parser.add_argument(
        "--batch-size", type=positive_int, help="windows per forward pass (default: 4 on a CPU, 64 on a GPU)"
    )
    for flag, field, kind, text in LIMIT_FLAGS:
        parser.add_argument(
            flag, dest=field, type=kind, default=getattr(d, field), help=f"{text} (default: %(default)s)"
        )
    parser.add_flag("--access-log", help="log every request")
    return parser.parse_args(argv)


def _check_port_free(host: str, port: int) -> int:
    """The port to serve on, proved free (port 0: one the system picks, named in the log instead of 0)."""
    import socket

    try:
        socket.getaddrinfo(host, port)
    except socket.gaierror as err:  # the host name itself
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err} (is --host an address here?)") from None
    try:
        with socket.create_server((host, port)) as probe:
            return probe.getsockname()[1]
    except OSError as err:
        raise OSError(
            f"cannot listen on {host}:{port}: {err.strerror or err} (another server there? pass --port)"
        ) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    from bertqa.model import check_model_folder

    check_model_folder(args.model)  # a mistyped path or a run's folder, named with what to pass instead
    try:
        import uvicorn
    except ImportError as err:
        raise ImportError('serving needs FastAPI and uvicorn: pip install -e ".[serve]"') from err
    from bertqa.deploy.service import ServiceLimits, create_app
    from bertqa.deploy.serving import Answerer

    limits = ServiceLimits(**{field: getattr(args, field) for _, field, _, _ in LIMIT_FLAGS})
    args.port = _check_port_free(args.host, args.port)  # before the model loads, and before saying where it serves
    answerer = Answerer(
        args.model,
        batch_size=args.batch_size,
        threshold=args.threshold,
        v2=args.v2,
        precision=args.mixed_precision,
        base_model=args.base_model,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "listening on %s: reachable from other machines, and the service has no authentication", args.host
        )
    untrained = ", UNTRAINED QA HEAD: its answers are noise" if answerer.untrained_head else ""
    logger.log(
        logging.WARNING if untrained else logging.INFO,
        "serving %s (%s%s%s) on http://%s:%d/ : the page at /, POST /answer, GET /health; Ctrl-C stops",
        *(args.model, answerer.backend, ", v2" if answerer.v2 else "", untrained, args.host, args.port),
    )
    app = create_app(answerer, limits)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=args.access_log)
    return 0


if __name__ == "__main__":
    run(main)
