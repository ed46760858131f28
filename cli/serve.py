"""`lidit serve CONFIG.yaml`, `lidit serve reload --url URL`, `lidit generate --url URL --prompt ...`."""

from __future__ import annotations

import argparse
import errno
import json
import re
import socket
from pathlib import Path

from cli.common import CommandError


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `serving.run.add_arguments`, same names and dests (tests/cli/test_help.py compares them).

    Defined here because `serving.run` imports pydantic (0.2-0.9 s on a busy box) when imported; drop this
    copy once `add_arguments` lives in a light `serving/args.py`, like `pipelines/args.py`.
    """
    parser.add_argument("--port", type=int, help="HTTP port (default: the config's, 8000)")
    parser.add_argument("--host", help="bind address (default: the config's, 127.0.0.1)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)"
    )


def register(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser(
        "serve",
        help="serve a registered model over HTTP (Ray Serve), or hot-swap a running server",
        description="lidit serve CONFIG.yaml [--port N] [--set k=v]  |  lidit serve reload --url URL",
    )
    srv.add_argument("config", metavar="CONFIG.yaml|reload", help="serve config, or 'reload'")
    add_serve_arguments(srv)
    srv.add_argument("--url", help="reload: base URL of the running server")
    srv.add_argument("--model", help="reload: switch to this model URI instead of re-resolving the alias")
    srv.add_argument("--api-key", help="reload: the admin key (default $LIDIT_ADMIN_KEY)")
    srv.set_defaults(handler=_serve)

    gen = sub.add_parser("generate", help="prompt(s) -> PNG files, against a running server")
    gen.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    gen.add_argument(
        "--prompt", action="append", required=True, help="prompt text; repeat for several prompts"
    )
    gen.add_argument("--n", type=int, default=1, help="images per prompt")
    gen.add_argument("--size", help="WxH, e.g. 64x64 (default: the server's)")
    gen.add_argument("--seed", type=int, help="sampling seed, for repeatable images (default: random)")
    gen.add_argument(
        "--steps", type=int, dest="num_inference_steps", help="sampler steps (default: the server's)"
    )
    gen.add_argument(
        "--guidance",
        type=float,
        dest="guidance_scale",
        help="classifier-free guidance scale (default: the server's)",
    )
    gen.add_argument("--negative-prompt", help="text to guide away from (default: none, the empty prompt)")
    gen.add_argument("--model", help="model name to request (default: whatever the server serves)")
    gen.add_argument("--out", default="generated", help="output folder")
    gen.add_argument("--api-key", help="bearer token (default $LIDIT_API_KEY)")
    gen.set_defaults(handler=_generate)


def _serve(args: argparse.Namespace) -> int:
    if args.config == "reload":
        return _reload(args)
    from serving.run import config_from_args, serve_forever

    cfg = config_from_args(args.config, args)
    check_port_free(cfg.host, cfg.port)
    check_model(cfg.model)  # before Ray starts: a missing model is one line, not a dead replica
    return serve_forever(cfg)


def check_port_free(host: str, port: int) -> None:
    """Raise a CommandError when `host:port` cannot be bound (another server holds it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CommandError(
                    f"port {port} on {host} is in use", "stop the other server or pass --port N (a free port)"
                ) from None
            raise CommandError(
                f"cannot bind {host}:{port} ({exc.strerror})", "pass another --host/--port"
            ) from None


def check_model(model: str) -> None:
    """Raise a CommandError when the model to serve does not exist (not registered, or not an export dir)."""
    from lidit.registry import configure_mlflow, parse_model_uri

    try:
        parsed = parse_model_uri(model)
    except ValueError as exc:
        raise CommandError(str(exc), "pass --set model=models:/NAME@ALIAS") from None
    if parsed is None:
        if not (Path(model) / "pipeline.json").is_file():
            raise CommandError(
                f"{model} is not a LI-DiT pipeline directory (no pipeline.json)",
                "pass --set model=models:/NAME@ALIAS or the directory of an exported pipeline",
            )
        return
    import mlflow

    configure_mlflow()
    client = mlflow.MlflowClient()
    # MLflow's RESOURCE_DOES_NOT_EXIST (no such model, alias or version) becomes one line in cli.errors.
    if parsed.alias:
        client.get_model_version_by_alias(parsed.name, parsed.alias)
    else:
        client.get_model_version(parsed.name, parsed.version)


def _reload(args: argparse.Namespace) -> int:
    from serving.client import ServerError, reload

    if not args.url:
        raise CommandError("lidit serve reload needs the server", "pass --url http://HOST:PORT", exit_code=2)
    try:
        result = reload(args.url, args.model, args.api_key)
    except ServerError as exc:
        raise server_error(exc, key_hint="pass --api-key ADMIN_KEY or set $LIDIT_ADMIN_KEY") from None
    print(json.dumps(result))
    return 0


def server_error(exc: object, key_hint: str = "pass --api-key KEY or set $LIDIT_API_KEY") -> CommandError:
    """A non-2xx answer as one line, with what to do for the status (`key_hint` for 401/403)."""
    status = getattr(exc, "status", 0)
    todo = {
        401: key_hint,
        403: key_hint,
        404: "check --url (and its route prefix) and --model",
        503: "the server is busy or still loading: retry in a few seconds",
    }.get(status, "fix the request (see the message)" if 400 <= status < 500 else "see the server's log")
    return CommandError(f"the server answered {exc}", todo)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "image"


def _generate(args: argparse.Namespace) -> int:
    from serving.client import ServerError, generate, save_pngs

    out = Path(args.out)
    for i, prompt in enumerate(args.prompt):
        try:
            images = generate(
                args.url,
                prompt,
                n=args.n,
                size=args.size,
                seed=args.seed,
                api_key=args.api_key,
                model=args.model,
                negative_prompt=args.negative_prompt,
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
            )
        except ServerError as exc:
            raise server_error(exc) from None
        # httpx transport errors (server down, wrong URL) become one line in cli.errors.
        for path in save_pngs(images, out, f"{i:03d}_{_slug(prompt)}"):
            print(path)
    return 0
