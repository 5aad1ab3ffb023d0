"""The ``anygpt`` command line.

    anygpt generate --preset mini "Draw a cat" --outputs image --out answer/
    anygpt presets
    anygpt train --config alignment/configs/stage2_decoding.yaml optim.lr=1e-3 [--resume | --resume-from CHECKPOINT]
    anygpt eval --model runs/stage2_decoding/model --data captions_val.jsonl
    anygpt world build --out runs/miniature [--quick]
    anygpt convert nextgpt pytorch_model.pt --base-llm vicuna-7b-v0/ --out nextgpt-7b/
    anygpt plan --preset nextgpt-7b --gpu-memory 12GB

Exit codes: 0 success; 1 an internal error (a bug: one line says where to report it, and
``--debug`` or ``ANYGPT_DEBUG=1`` prints its traceback); 2 an :class:`~anygpt.errors.AnyGPTError`
(a problem the user can fix) or a usage error; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

from anygpt.config import DECODE_OPTIONS, SAMPLING_OPTIONS
from anygpt.dtypes import DTYPE_NAMES
from anygpt.errors import AnyGPTError
from anygpt.modalities import MODALITIES, get_modality
from anygpt.options import Option, check_options

logger = logging.getLogger("anygpt")

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _command(name: str):
    def wrap(fn):
        _COMMANDS[name] = fn
        return fn
    return wrap


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


_DEBUG_HELP = "on an error, also print its traceback (same as ANYGPT_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anygpt", description="Any-to-any multimodal generation.")
    from importlib.metadata import version

    parser.add_argument("--version", action="version", version=f"anygpt {version('anygpt')}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress at INFO level and show the libraries' warnings")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    # --debug is accepted after the subcommand too. Its default there is SUPPRESS: a subparser's
    # defaults overwrite the top-level values, which would undo `anygpt --debug generate ...`.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    gen = add("generate", help="answer one prompt with text and media")
    gen.add_argument("prompt", help="the message; <image>/<audio>/<video> mark where media go")
    _add_model_arguments(gen)
    _add_media_arguments(gen)
    gen.add_argument("--outputs", type=_csv, default=[], metavar="M[,M]",
                     help="modalities the answer must contain, e.g. image,audio,video")
    gen.add_argument("--out", type=Path, default=Path("outputs"), help="output directory (default: outputs)")
    _add_option_arguments(gen, SAMPLING_OPTIONS, "generation")
    _add_option_arguments(gen, DECODE_OPTIONS, "decoders (default: the preset's)")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")

    app = add("app", help="serve the Gradio chat app")
    _add_model_arguments(app)
    app.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    app.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    app.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    app.add_argument("--out", type=Path, default=Path("outputs/app"),
                     help="folder for generated media; the only folder served (default: outputs/app)")
    app.add_argument("--max-upload-mb", type=float, default=50.0, help="largest accepted upload (default: 50)")
    app.add_argument("--concurrency", type=int, default=1, help="model calls at once (default: 1)")

    srv = add("serve", help="serve an OpenAI-compatible API (/v1) with the chat app at /",
              description="OpenAI-compatible HTTP API: POST /v1/chat/completions (text, image, audio and video "
                          "in and out), POST /v1/images/generations, GET /v1/models; the chat app at /.")
    _add_model_arguments(srv)
    srv.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    srv.add_argument("--api-key", default=os.environ.get("ANYGPT_API_KEY"),
                     help="require 'Authorization: Bearer KEY' on /v1 (default: $ANYGPT_API_KEY, else none)")
    srv.add_argument("--media-dir", type=Path, default=None,
                     help="a folder whose files requests may name by path (default: data URLs only)")
    srv.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body (default: 64)")
    srv.add_argument("--no-app", dest="with_app", action="store_false", help="serve the API only")
    srv.add_argument("--out", type=Path, default=Path("outputs/app"),
                     help="the chat app's folder for generated media (default: outputs/app)")
    srv.add_argument("--max-upload-mb", type=float, default=50.0, help="the app's largest upload (default: 50)")
    srv.add_argument("--concurrency", type=int, default=1,
                     help="model calls at once, app and API together (default: 1)")
    srv.add_argument("--max-queue", type=int, default=64, help="requests waiting before 503 (default: 64)")

    tr = add("train", help="run one alignment stage (works under `accelerate launch`)",
             description="Train one stage of the alignment recipe. Shipped stage configs: "
                         "alignment/configs/stage{1_encoding,2_decoding,3_instruction}.yaml.")
    tr.add_argument("--config", required=True, type=Path, help="stage config .yaml")
    tr.add_argument("--resume", action="store_true",
                    help="continue from the newest checkpoint under <output_dir>/checkpoints")
    tr.add_argument("--resume-from", type=Path, default=None, metavar="CHECKPOINT",
                    help="continue from this checkpoint folder (<output_dir>/checkpoints/checkpoint-N)")
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="dotted config overrides, e.g. optim.lr=1e-3 train.max_steps=200")

    ev = add("eval", help="evaluate a model on a held-out manifest, or on the world (eval world)",
             description="`anygpt eval --model DIR --data FILE` scores an aligned model on a held-out "
                         "manifest; `anygpt eval world --model mini` measures how well it draws, "
                         "sings, films and understands the synthetic world.")
    ev.add_argument("suite", nargs="?", choices=("manifest", "world"), default="manifest",
                    help="what to evaluate on (default: manifest)")
    _add_model_arguments(ev)
    ev.add_argument("--data", type=Path, default=None, help="manifest: JSONL of caption and/or dialogue rows")
    ev.add_argument("--decode", type=int, default=2, help="manifest: examples per modality decoded (default: 2)")
    ev.add_argument("--max-examples", type=int, default=None, help="manifest: at most this many rows of each kind")
    ev.add_argument("--cases", type=int, default=18, help="world: prompts per modality and section (default: 18)")
    ev.add_argument("--max-new-tokens", type=int, default=48,
                    help="world, and manifest with --metrics: LLM budget per answer (default: 48)")
    ev.add_argument("--metrics", type=_csv, default=(), metavar="M[,M]",
                    help="also score media generated from the captions (manifest) or for every world item "
                         "(world), e.g. fid,clip,fad,clap,clipsim (see alignment/README.md)")
    ev.add_argument("--clip-model", default=None, metavar="ID|DIR",
                    help="CLIPModel for fid, clip and clipsim, or 'encoder' (the model's own; the default "
                         "of world); manifest default: openai/clip-vit-base-patch32")
    ev.add_argument("--clap-model", default=None, metavar="ID|DIR",
                    help="ClapModel for fad and clap, or 'encoder'; manifest default: laion/clap-htsat-unfused")
    ev.add_argument("--sections", type=_csv, default=None, metavar="S[,S]",
                    help="world: decoders, forced, auto, understanding, chat (default: all)")
    ev.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    ev.add_argument("--out", type=Path, default=None,
                    help="manifest: write the metrics to this JSON file; world: write metrics, table and "
                         "sample sheets into this folder")

    wo = add("world", help="build the miniature: train every part of `mini` on the world",
             description="`anygpt world build --out DIR` trains the encoder, the three decoders and "
                         "the three alignment stages on the procedural world, and packages the "
                         "result as a model directory (DIR/mini). Reruns resume: finished steps "
                         "are skipped. Settings: alignment/configs/miniature.yaml.")
    wo.add_argument("action", choices=("build",), help="what to do (build)")
    wo.add_argument("--out", type=Path, required=True, help="the build folder (created; resumed if it exists)")
    wo.add_argument("--config", type=Path, default=None, help="build settings .yaml (default: the shipped ones)")
    wo.add_argument("--quick", action="store_true", help="every step cut to a handful of steps (a smoke run)")
    wo.add_argument("--redo", type=_csv, default=[], metavar="STEP[,STEP]",
                    help="run these steps (and every later one) again")
    wo.add_argument("--until", default=None, metavar="STEP", help="stop after this step")
    wo.add_argument("--no-progress", action="store_true", help="no progress bars")
    wo.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="dotted settings overrides, e.g. image_decoder.unet.steps=3000")

    co = add("convert", help="convert NExT-GPT's released checkpoint into a model directory",
             description="`anygpt convert nextgpt CHECKPOINT --base-llm DIR --out DIR` checks NExT-GPT's "
                         "pytorch_model.pt against the architecture (every tensor and shape, the "
                         "signal-token ids), merges its LoRA into the base LLM and writes a "
                         "self-contained model directory (try: anygpt app --model DIR).")
    co.add_argument("format", choices=("nextgpt",), help="the checkpoint's format (nextgpt)")
    co.add_argument("checkpoint", help="NExT-GPT's pytorch_model.pt, or hub_id:filename "
                                       "(ChocoWu/nextgpt_7b_tiva_v0:pytorch_model.pt)")
    co.add_argument("--base-llm", required=True, metavar="DIR",
                    help="the LLM it was trained on (Vicuna-7B v0): a Hugging Face folder or hub id")
    co.add_argument("--out", type=Path, required=True, metavar="DIR",
                    help="the model directory to write (replaced if it is one)")
    co.add_argument("--preset", default="nextgpt-7b", metavar="NAME",
                    help="the architecture: preset name, config .yaml or model directory (default: nextgpt-7b)")
    co.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                    help="LoRA alpha (default: adapter_config.json next to the checkpoint, else NExT-GPT's 32)")
    co.add_argument("--lora-r", type=int, default=None, metavar="R",
                    help="LoRA rank (default: adapter_config.json, else the tensors' rank; checked against them)")
    co.add_argument("--allow-unexpected", action="store_true",
                    help="ignore tensors NExT-GPT's format does not have (listed in a warning) instead of failing")
    co.add_argument("--added-tokens", type=Path, default=None, metavar="FILE",
                    help="NExT-GPT's saved added_tokens.json, giving its tokens' ids (default: the one next to "
                         "the checkpoint or in its parent folder, else NExT-GPT's published ids)")

    pl = add("plan", help="plan where each component lives for a GPU memory budget",
             description="Print each component's weights and estimated working memory, where it lives "
                         "(on the GPU, moved in while it runs, or split with the CPU) and the expected "
                         "peak, for the cheapest plan that fits. `nextgpt-7b` is sized from its public "
                         "architectures on the meta device (no download); other models are loaded. "
                         "`generate` and `app` apply the same plan with --gpu-memory.")
    pl.add_argument("--preset", "--model", dest="model", default="nextgpt-7b",
                    help="preset name, model directory or config .yaml (default: nextgpt-7b)")
    pl.add_argument("--gpu-memory", required=True, metavar="SIZE", help="the budget, e.g. 24GB, 12GB, 11000MB")

    pre = add("presets", help="list the shipped presets and their components")
    pre.add_argument("--show", metavar="NAME", help="print one preset's YAML")
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", "--model", dest="model", default="mini",
                        help="preset name, model directory, config .yaml or hub id owner/name (default: mini)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                        help="LLM/encoder dtype (default: float16 on CUDA, float32 on CPU)")
    parser.add_argument("--gpu-memory", default=None, metavar="SIZE",
                        help="fit the model into this much GPU memory (e.g. 12GB): see `anygpt plan`")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the LLM's decode step (static KV cache) and the decoders' UNets; "
                             "pays off on a GPU, after the first answer")


def _add_media_arguments(parser: argparse.ArgumentParser) -> None:
    """One repeatable ``--<modality> FILE`` flag per registered modality."""
    for name in MODALITIES:
        spec = get_modality(name)
        parser.add_argument(f"--{name}", action="append", default=[], metavar="FILE",
                            help=f"attach {spec.noun} ({', '.join(spec.input_suffixes)}; repeatable)")


def _add_option_arguments(parser: argparse.ArgumentParser, options: Sequence[Option], title: str) -> None:
    """One flag per declared option (see :mod:`anygpt.options`); unset flags leave the default."""
    group = parser.add_argument_group(title)
    for opt in options:
        if opt.type is bool:
            if opt.false_flag:
                group.add_argument(opt.false_flag, dest=opt.name, action="store_const", const=False,
                                   default=None, help=f"{opt.name} = false ({opt.help})")
            else:
                group.add_argument(opt.cli_flag, dest=opt.name, action=argparse.BooleanOptionalAction,
                                   default=None, help=opt.help)
            continue
        bounds = f" ({opt.describe_range()})" if opt.describe_range() else ""
        group.add_argument(opt.cli_flag, dest=opt.name, type=opt.type, default=None,
                           metavar=opt.type.__name__.upper(), help=opt.help + bounds)


def _load_pipeline(args: argparse.Namespace, progress: bool = True):
    """The pipeline named by ``--preset/--model`` on ``--device`` (default: CUDA if available)
    in ``--dtype`` (default: float16 on CUDA, float32 on CPU)."""
    import torch

    from anygpt.pipeline import AnyGPTPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.startswith("cuda") else None)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    pipe = AnyGPTPipeline.from_pretrained(args.model, device=device, dtype=dtype,
                                          memory=getattr(args, "gpu_memory", None))
    pipe.set_progress_bar_config(disable=not progress)
    if getattr(args, "compile", False):
        pipe.optimize(compile=True)
    return pipe


@_command("generate")
def _generate(args: argparse.Namespace) -> int:
    from anygpt.conversation import Conversation
    from anygpt.export import save_output
    from anygpt.types import MediaStarted, TextDelta

    settings = {opt.name: getattr(args, opt.name) for opt in (*SAMPLING_OPTIONS, *DECODE_OPTIONS)}
    check_options((*SAMPLING_OPTIONS, *DECODE_OPTIONS), settings)  # a bad flag fails before the model loads
    pipe = _load_pipeline(args, progress=not args.quiet)
    media = {name: getattr(args, name) for name in MODALITIES if getattr(args, name)}
    output, line_open = None, False
    for event in pipe.stream(Conversation(), args.prompt, outputs=args.outputs, media=media, **settings):
        if isinstance(event, TextDelta):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            line_open = True
        elif isinstance(event, MediaStarted):
            if line_open:  # end the answer's line: the decoders' bars (stderr) must not overwrite it
                sys.stdout.write("\n")
                sys.stdout.flush()
                line_open = False
            logger.info("decoding %s %d", event.modality, event.index)
        output = event
    if line_open:
        sys.stdout.write("\n")
    for path in save_output(output, args.out):
        print(f"wrote {path}")
    return 0


@_command("app")
def _app(args: argparse.Namespace) -> int:
    pipe = _load_pipeline(args, progress=False)

    from anygpt.app.chat import build_app
    from anygpt.app.server import launch

    demo = build_app(pipe, output_dir=args.out, max_upload_mb=args.max_upload_mb,
                     concurrency=args.concurrency)
    launch(demo, host=args.host, port=args.port, share=args.share, block=True)
    return 0


@_command("serve")
def _serve(args: argparse.Namespace) -> int:
    pipe = _load_pipeline(args, progress=False)

    from anygpt.app.server import serve

    serve(pipe, host=args.host, port=args.port, api_key=args.api_key, app=args.with_app, output_dir=str(args.out),
          max_upload_mb=args.max_upload_mb, concurrency=args.concurrency, max_queue=args.max_queue,
          media_dir=str(args.media_dir) if args.media_dir else None, max_request_mb=args.max_request_mb)
    return 0


@_command("train")
def _train(args: argparse.Namespace) -> int:
    import os

    from anygpt.alignment.config import load_train_config
    from anygpt.alignment.recipe import train

    config = load_train_config(args.config, args.overrides)
    # Training is long: its progress is logged on the main process even without -v. (The rank
    # comes from the launcher's environment: accelerate's state must not be created before the
    # recipe's Accelerator.)
    main_process = int(os.environ.get("RANK", "0")) == 0
    level = logging.INFO if main_process else logging.WARNING
    logging.getLogger("anygpt.alignment").setLevel(min(level, logging.getLogger().level))
    result = train(config, resume=args.resume_from or args.resume)
    if main_process:
        print(f"trained {result.step} steps; model: {result.model_dir}")
    return 0


@_command("eval")
def _eval(args: argparse.Namespace) -> int:
    import json

    if args.suite == "world":
        return _eval_world(args)
    if args.data is None:
        raise AnyGPTError("eval: --data is required to evaluate on a manifest (or run `anygpt eval world`)")
    from anygpt.alignment.evaluate import evaluate

    # Loaded as every other command loads it, so --device, --dtype and --gpu-memory apply.
    pipe = _load_pipeline(args, progress=False)
    metrics = evaluate(pipe, args.data, decode=args.decode, seed=args.seed, max_examples=args.max_examples,
                       metrics=args.metrics, extractors={"clip": args.clip_model, "clap": args.clap_model},
                       max_new_tokens=args.max_new_tokens)
    text = json.dumps(metrics, indent=2, sort_keys=True)
    print(_metrics_table(metrics))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def _metrics_table(metrics: dict[str, float]) -> str:
    """``metric  value`` rows, sorted by name, values to four significant digits."""
    width = max([len("metric"), *map(len, metrics)])
    rows = [f"{'metric':<{width}}  value"] + [f"{name:<{width}}  {metrics[name]:.4g}" for name in sorted(metrics)]
    return "\n".join(rows)


def _eval_world(args: argparse.Namespace) -> int:
    from anygpt.alignment.world.evaluate import BARS, evaluate_world

    pipe = _load_pipeline(args, progress=False)
    report = evaluate_world(pipe, seed=args.seed, cases=args.cases, max_new_tokens=args.max_new_tokens,
                            sections=args.sections or tuple(BARS), metrics=args.metrics,
                            extractors={"clip": args.clip_model, "clap": args.clap_model},
                            progress=sys.stderr.isatty())
    print(report.table())
    if args.out is not None:
        for path in _write_world_report(report, args.out):
            print(f"wrote {path}")
    return 0


def _write_world_report(report, folder: Path) -> list[Path]:
    """metrics.json, table.txt and the sample sheets of a world report."""
    import json

    from anygpt.alignment.world import sheets

    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "metrics.json", folder / "table.txt"]
    written[0].write_text(json.dumps({"rates": report.rates, "counts": report.counts, "passes": report.passes(),
                                      "metrics": report.metrics, "answers": report.answers}, indent=2) + "\n")
    written[1].write_text(report.table() + "\n")
    makers = {"image": sheets.image_sheet, "video": sheets.clip_sheet, "audio": sheets.spectrogram_sheet}
    for section, by_modality in report.samples.items():
        for modality, values in by_modality.items():
            path = folder / f"{section}_{modality}.png"
            makers[modality](values, report.captions[section][modality]).save(path)
            written.append(path)
    return written


@_command("world")
def _world(args: argparse.Namespace) -> int:
    import time

    from anygpt.alignment.miniature import build_miniature, load_build_settings

    # A build is long: its steps are logged even without -v.
    logging.getLogger("anygpt.alignment").setLevel(min(logging.INFO, logging.getLogger().level))
    settings = load_build_settings(args.config, args.overrides, quick=args.quick)
    start = time.perf_counter()
    result = build_miniature(args.out, settings, redo=args.redo, until=args.until, progress=not args.no_progress)
    ran = ", ".join(result.ran) or "nothing (every step was done before)"
    print(f"ran {ran} in {time.perf_counter() - start:.0f} s; all steps took {result.seconds:.0f} s")
    if result.model_dir.is_dir():
        print(f"model: {result.model_dir}  (try: anygpt generate --model {result.model_dir} \"Draw a red circle\")")
    return 0


@_command("convert")
def _convert(args: argparse.Namespace) -> int:
    from anygpt.convert import convert_nextgpt

    # A conversion takes minutes (a 7B LLM is loaded, merged and written): its steps, and the
    # LoRA scale it chose, are logged even without -v.
    for name in ("anygpt.convert", "anygpt.nextgpt"):
        logging.getLogger(name).setLevel(min(logging.INFO, logging.getLogger().level))
    out = convert_nextgpt(args.checkpoint, args.base_llm, args.out, preset=args.preset, lora_alpha=args.lora_alpha,
                          lora_r=args.lora_r, allow_unexpected=args.allow_unexpected, added_tokens=args.added_tokens)
    print(f"wrote {out}  (try: anygpt app --model {out})")
    return 0


@_command("plan")
def _plan(args: argparse.Namespace) -> int:
    from anygpt import memory

    budget = memory.parse_memory(args.gpu_memory)
    if args.model == "nextgpt-7b":
        components = memory.preset_components(args.model)
    else:
        from anygpt.pipeline import AnyGPTPipeline

        components = memory.pipeline_components(AnyGPTPipeline.from_pretrained(args.model))
    plan = memory.plan_memory(components, budget)
    print(f"{args.model}:")
    print(plan.format())
    return 0 if plan.fits else 2


@_command("presets")
def _presets(args: argparse.Namespace) -> int:
    from anygpt.config import AnyGPTConfig, list_presets, preset_file

    if args.show:
        AnyGPTConfig.from_name(args.show)  # validates, and lists the valid names if unknown
        print(preset_file(args.show).read_text(), end="")
        return 0
    for name in list_presets():
        cfg = AnyGPTConfig.from_name(name)
        print(f"{name}: {cfg.description}")
        print(f"  encoder: {cfg.encoder.pretrained or 'random ' + cfg.encoder.name}")
        print(f"  llm:     {cfg.llm.pretrained or 'random ' + cfg.llm.arch['model_type']}")
        for modality, m in cfg.modalities.items():
            parts = []
            if m.has_input:
                parts.append(f"in: {m.input_projector.kind} x{m.input_projector.num_tokens}")
            if m.has_output:
                parts.append(f"out: {m.num_signal_tokens} signal tokens -> "
                             f"{m.decoder.name} ({m.decoder.pretrained or 'random tiny'})")
            print(f"  {modality + ':':8} {'; '.join(parts)}")
    return 0


def _one_line(text: str) -> str:
    """``text`` with its lines joined: every error report is a single line."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _issues_url() -> str:
    """Where bugs are reported: the ``[project.urls]`` of the installed package's metadata
    (an Issues / Bug Tracker entry, else the repository or homepage)."""
    try:
        from importlib.metadata import metadata

        entries = metadata("anygpt").get_all("Project-URL") or []
    except Exception:  # noqa: BLE001 - not installed, or unreadable metadata
        entries = []
    urls = {}
    for entry in entries:
        label, _, url = entry.partition(",")
        urls[label.strip().lower().replace(" ", "").replace("-", "")] = url.strip()
    for label in ("issues", "bugtracker", "tracker", "bugs", "repository", "source", "homepage"):
        if urls.get(label):
            return urls[label]
    return "the AnyGPT issue tracker"


def _internal_error_line(exc: BaseException) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("anygpt")
    except PackageNotFoundError:  # run from a source tree that was never installed
        __version__ = "(not installed)"

    kind = type(exc).__qualname__
    if type(exc).__module__ not in ("builtins", "__main__"):
        kind = f"{type(exc).__module__}.{kind}"
    detail = _one_line(str(exc))
    return (f"internal error (a bug in anygpt {__version__}): {kind}{': ' + detail if detail else ''}; "
            f"please report it at {_issues_url()} with the command you ran; "
            f"rerun with --debug for the traceback")


def _debug_from_env() -> bool:
    return os.environ.get("ANYGPT_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


#: Libraries whose warnings (deprecations, optional-backend notices) are not the user's concern
#: by default; ``--verbose`` shows them.
_LIBRARY_LOGGERS = ("torch", "torchao", "transformers", "diffusers", "accelerate", "huggingface_hub", "peft")


def _quiet_libraries() -> None:
    """Route Python warnings to logging and keep the libraries' warnings off stderr.

    transformers and diffusers reset their loggers' levels from these variables when first
    imported, so the variables are what holds; the CLI is the program here, so it may set them.
    torch resets its own when imported, so it is imported before its level is set.
    """
    import torch  # noqa: F401 - importing torch resets its loggers' levels: import it first

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``anygpt`` console script.

    Returns 0 on success, 2 for an :class:`AnyGPTError` (one ``error: ...`` line), 1 for any
    other exception (a bug: one line saying where to report it), 130 when interrupted. With
    ``--debug`` (or ``ANYGPT_DEBUG=1``) the traceback is printed too. Usage errors exit 2
    through argparse's ``SystemExit``, which is not caught.
    """
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or _debug_from_env()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_libraries()
    try:
        return _COMMANDS[args.command](args)
    except AnyGPTError as exc:
        if debug:
            traceback.print_exc(file=sys.stderr)
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence; SystemExit passes through
        if debug:
            traceback.print_exc(file=sys.stderr)
        print(_internal_error_line(exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
