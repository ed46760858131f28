"""`lidit serve CONFIG.yaml`, `lidit serve reload --url URL`, `lidit generate --url URL --prompt ...`."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from serving.run import add_arguments

    srv = sub.add_parser(
        "serve",
        help="serve a registered model over HTTP (Ray Serve), or hot-swap a running server",
        description="lidit serve CONFIG.yaml [--port N] [--set k=v]  |  lidit serve reload --url URL",
    )
    srv.add_argument("config", metavar="CONFIG.yaml|reload", help="serve config, or 'reload'")
    add_arguments(srv)
    srv.add_argument("--url", help="reload: base URL of the running server")
    srv.add_argument("--model", help="reload: switch to this model URI instead of re-resolving the alias")
    srv.add_argument("--api-key", help="reload: API key (default $LIDIT_API_KEY)")
    srv.set_defaults(handler=_serve)

    gen = sub.add_parser("generate", help="prompt(s) -> PNG files, against a running server")
    gen.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    gen.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    gen.add_argument("--n", type=int, default=1, help="images per prompt")
    gen.add_argument("--size", help="WxH, e.g. 64x64")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--steps", type=int, dest="num_inference_steps")
    gen.add_argument("--guidance", type=float, dest="guidance_scale")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--model", help="model name to request (default: whatever the server serves)")
    gen.add_argument("--out", default="generated", help="output folder (default ./generated)")
    gen.add_argument("--api-key", help="bearer token (default $LIDIT_API_KEY)")
    gen.set_defaults(handler=_generate)


def _serve(args: argparse.Namespace) -> int:
    if args.config == "reload":
        return _reload(args)
    from serving.run import config_from_args, serve_forever

    return serve_forever(config_from_args(args.config, args))


def _reload(args: argparse.Namespace) -> int:
    from serving.client import ServerError, reload

    if not args.url:
        print("lidit serve reload: --url is required", file=sys.stderr)
        return 2
    try:
        result = reload(args.url, args.model, args.api_key)
    except ServerError as exc:
        print(f"lidit serve reload: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "image"


def _generate(args: argparse.Namespace) -> int:
    import httpx

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
            print(f"lidit generate: {exc}", file=sys.stderr)
            return 1
        except httpx.HTTPError as exc:
            print(f"lidit generate: cannot reach {args.url}: {exc}", file=sys.stderr)
            return 1
        for path in save_pngs(images, out, f"{i:03d}_{_slug(prompt)}"):
            print(path)
    return 0
