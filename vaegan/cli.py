"""The `vaegan` command. It parses arguments, then calls the library; nothing else.

    vaegan config show PRESET [key=value ...] [--config YAML] [--params]
    vaegan train [--preset P] [--config YAML] [key=value ...]
    vaegan tune [--preset P] [key=value ...] [--grid KEY=V1,V2] [--loguniform KEY=LO:HI]
                [--uniform KEY=LO:HI] [--seeds N] [--scheduler asha|fifo]
                [--gamma-min A --gamma-max B] [--lr-min --lr-max]
                [--trials N] [--workers-per-trial K] [--metric M] [--mode min|max]
                [--grace-period S] [--max-concurrent C] [--name SWEEP]
    vaegan demo
    vaegan eval CHECKPOINT --shards URL --featurizer DIR|inception [-n N] [--json OUT]
    vaegan eval train-featurizer --shards URL --label-key KEY --out DIR [--steps N]
    vaegan data prepare --source SRC --out DEST [--image-size N] [--channels C] [--shard-size N]
                        [--format png|jpg] [--seed S] [--val-fraction F] [--s3-endpoint URL]
    vaegan data check --shards URL
    vaegan bench data --shards URL [--workers N] [--batches N] [--batch-size B] [--cache-mb MB]
    vaegan bench step [--preset celeba64] [key=value ...] [--steps N]
    vaegan bench train [--preset mnist32] [key=value ...] [--workers W] [--threads T] [--steps N] [--json]
    vaegan models list [NAME] | promote NAME [--from challenger] [--to champion] [--force]
    vaegan models sample|reconstruct|interpolate|edit URI ... (-o PNG)
    vaegan models attributes URI --shards URL [--json OUT]
    vaegan models serve URI [--host H] [--port P] [--max-body-bytes N] [--max-output-values N]
"""

from __future__ import annotations

import argparse
import sys

from vaegan.config import COMPARE_METRIC, LATENTS, PRESETS, load_config, redact_text
from vaegan.errors import UserError

# Building the parser imports nothing heavy (no torch, Ray or MLflow), so `vaegan --help` and
# argument errors are instant; each command imports what it runs.


def _config_show(args: argparse.Namespace) -> None:
    cfg = load_config(args.preset, args.config, args.overrides)
    print(cfg.redacted().to_yaml(), end="")  # what is shown is redacted, like what is logged
    if args.params:
        import torch

        from vaegan.model import VAEGAN, dis_l_shape, param_count

        with torch.device("meta"):  # shapes only: no weights to draw
            model = VAEGAN(cfg.model)
        print("# parameters")
        for name in ("encoder", "decoder", "discriminator"):
            print(f"#   {name:<14} {param_count(getattr(model, name)):>12,}")
        print(f"#   {'total':<14} {param_count(model):>12,}")
        c, h, w = dis_l_shape(cfg.model)
        print(f"# Dis_l: {c} x {h} x {w} = {c * h * w:,} features")


def _add_config(sub) -> None:
    config = sub.add_parser("config", help="inspect configs and presets")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print a preset's resolved config as YAML")
    show.add_argument("preset", help=f"one of: {', '.join(PRESETS)}")
    _add_overrides(show)
    show.add_argument("--params", action="store_true",
                      help="also print the parameter count of each network")
    show.set_defaults(func=_config_show)


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. loss.gamma=0.1 train.steps=500")
    parser.add_argument("--config", help="a YAML file applied before the overrides")


def _train(args: argparse.Namespace) -> None:
    from vaegan.train import main_train

    main_train(load_config(args.preset, args.config, args.overrides))


def _demo(args: argparse.Namespace) -> None:
    from vaegan.demo import run_demo

    run_demo()


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train on Ray (RAY_ADDRESS, or a local Ray)")
    p.add_argument("--preset", default="debug", help=f"one of: {', '.join(PRESETS)} (default debug)")
    _add_overrides(p)
    p.set_defaults(func=_train)
    d = sub.add_parser("demo", help="the embedded demo: mnist5k, 2 local workers, local MLflow")
    d.set_defaults(func=_demo)


def _tune(args: argparse.Namespace) -> None:
    from vaegan.tune import main_tune

    main_tune(load_config(args.preset, args.config, args.overrides), sweep_options(args))


def sweep_options(args: argparse.Namespace):
    """The parsed `vaegan tune` arguments -> vaegan.tune.SweepOptions."""
    from vaegan.tune import SweepOptions

    return SweepOptions(
        name=args.name, trials=args.trials, grid=dict(args.grid), loguniform=dict(args.loguniform),
        uniform=dict(args.uniform), seeds=args.seeds, gamma_min=args.gamma_min, gamma_max=args.gamma_max,
        lr_min=args.lr_min, lr_max=args.lr_max, scheduler=args.scheduler,
        workers_per_trial=args.workers_per_trial, metric=args.metric, mode=args.mode,
        grace_period=args.grace_period, reduction_factor=args.reduction_factor,
        max_concurrent=args.max_concurrent, seed=args.seed, compare=args.compare)


def _space_arg(kind: str):
    """argparse type for --grid KEY=V1,V2 (-> (key, [values])) and --loguniform / --uniform
    KEY=LOW:HIGH (-> (key, (low, high))); values are YAML, as in key=value overrides."""
    import yaml

    def parse(text: str):
        key, eq, raw = text.partition("=")
        if not eq or not key.strip() or not raw.strip() or (kind != "grid" and ":" not in raw):
            example = "loss.mode=vae,vaegan" if kind == "grid" else "loss.gamma=1e-4:1"
            form = "V1,V2,..." if kind == "grid" else "LOW:HIGH"
            raise argparse.ArgumentTypeError(f"{text!r} is not KEY={form} (e.g. {example})")
        if kind == "grid":
            return key.strip(), [yaml.safe_load(v) for v in raw.split(",") if v.strip()]
        lo, colon, hi = raw.partition(":")
        try:
            return key.strip(), (float(yaml.safe_load(lo)), float(yaml.safe_load(hi)))
        except (TypeError, ValueError, yaml.YAMLError):
            raise argparse.ArgumentTypeError(f"{text!r}: LOW:HIGH must be two numbers (e.g. 1e-4:1)"
                                             ) from None

    return parse


def _add_tune(sub) -> None:
    from vaegan.tune import SweepOptions

    d = SweepOptions()
    p = sub.add_parser("tune", help="Ray Tune sweep over any config keys (ASHA), MLflow parent/child runs",
                       description="Each trial trains the config with values from the search space on Ray "
                       "(default: loss.gamma log-uniform); the best completed trial is registered as "
                       "tracking.model_name@challenger. The same command with the same --name resumes an "
                       "interrupted sweep.")
    p.add_argument("--preset", default="debug", help=f"one of: {', '.join(PRESETS)} (default debug)")
    _add_overrides(p)
    p.add_argument("--name", default="", help="the sweep's name (default TRAIN_NAME-sweep)")
    p.add_argument("--grid", action="append", default=[], type=_space_arg("grid"), metavar="KEY=V1,V2",
                   help="try every value of a config key, e.g. loss.mode=vae,vae_dis_l,gan,vaegan")
    p.add_argument("--loguniform", action="append", default=[], type=_space_arg("range"),
                   metavar="KEY=LOW:HIGH", help="draw a key log-uniformly, e.g. loss.gamma=1e-4:1 "
                   "(repeatable)")
    p.add_argument("--uniform", action="append", default=[], type=_space_arg("range"),
                   metavar="KEY=LOW:HIGH", help="draw a key uniformly (repeatable)")
    p.add_argument("--seeds", type=int, default=d.seeds,
                   help="repeat every configuration with train.seed + 0..N-1 (default 1)")
    p.add_argument("--trials", type=int, default=d.trials,
                   help="samples of the random keys, each with every grid point (default 8, or 1 for a grid)")
    p.add_argument("--scheduler", default=d.scheduler, choices=["asha", "fifo"],
                   help="asha stops poor trials early; fifo runs all to the end (default asha)")
    p.add_argument("--gamma-min", type=float, default=d.gamma_min,
                   help=f"the default search (no --grid/--loguniform/--uniform): default {d.gamma_min:g}")
    p.add_argument("--gamma-max", type=float, default=d.gamma_max, help=f"default {d.gamma_max:g}")
    p.add_argument("--lr-min", type=float, help="with --lr-max: search optim.lr too (log-uniform)")
    p.add_argument("--lr-max", type=float)
    p.add_argument("--workers-per-trial", type=int, default=0, help="default train.num_workers")
    p.add_argument("--metric", default=d.metric, help=f"what ASHA compares (default {d.metric}, "
                   "which needs train.eval_every > 0; or a step metric such as loss)")
    p.add_argument("--mode", default="", choices=["min", "max"],
                   help="default: max for eval_ssim_recon / eval_recognisable, else min")
    p.add_argument("--grace-period", type=int, default=0,
                   help="steps before ASHA may stop a trial (default ~ train.steps / 8)")
    p.add_argument("--reduction-factor", type=float, default=d.reduction_factor,
                   help=f"ASHA keeps the best 1/R at each rung (default {d.reduction_factor:g})")
    p.add_argument("--max-concurrent", type=int, default=d.max_concurrent,
                   help=f"trials at the same time (default {d.max_concurrent})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"search seed (default {d.seed})")
    p.add_argument("--compare", action="store_true",
                   help="afterwards score every completed trial's final model (FID, KID, sharpness, "
                   "recognisability) and draw one row per configuration: the models side by side")
    p.set_defaults(func=_tune)


def _eval(args: argparse.Namespace) -> None:
    """`vaegan eval CHECKPOINT ...` or `vaegan eval train-featurizer ...` (one parser for both,
    since argparse cannot mix a positional path with sub-commands)."""
    from vaegan.evaluate import EvalError

    def need(*flags: str) -> None:
        missing = [f for f in flags if getattr(args, f.lstrip("-").replace("-", "_")) is None]
        if missing:
            raise EvalError(f"vaegan eval {args.target}: missing {', '.join(missing)}")

    if args.target == "train-featurizer":
        from vaegan.featurizer import STEPS, train_featurizer

        need("--shards", "--label-key", "--out")
        f = train_featurizer(args.shards, args.label_key, args.out, steps=args.steps or STEPS,
                             batch_size=args.batch_size, seed=args.seed, kind=args.kind, log=print)
        m = f.meta
        print(f"featurizer ({m.kind}, {len(m.labels)} outputs) -> {args.out}: val accuracy "
              f"{m.val_accuracy:.4f} on {m.val_images} images, trained {m.train_seconds:.1f} s")
        return
    from vaegan.evaluate import EVAL_SPLIT, FID_N, format_report, run_eval, write_report

    need("--shards", "--featurizer")
    report = run_eval(args.target, args.shards, args.featurizer, n=args.n or FID_N,
                      split=args.split or EVAL_SPLIT, seed=args.seed,
                      inception_weights=args.inception_weights, device=args.device)
    print(format_report(report))
    if args.json:
        write_report(report, args.json)


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="FID and reconstruction metrics of a checkpoint; train a featurizer",
        usage="vaegan eval CHECKPOINT --shards URL --featurizer DIR|inception [-n N] [--json OUT]\n"
              "       vaegan eval train-featurizer --shards URL --label-key KEY --out DIR [--steps N]",
        description="The FID protocol is documented in vaegan/evaluate.py.")
    p.add_argument("target", metavar="CHECKPOINT|train-featurizer",
                   help="a checkpoint directory (or a {config, model} file), or train-featurizer")
    p.add_argument("--shards", help="the data's shards (URL or folder), as written by the data layer")
    p.add_argument("--seed", type=int, default=0, help="prior-sample / featurizer seed (default 0)")
    e = p.add_argument_group("evaluate a checkpoint")
    e.add_argument("--featurizer", help="a featurizer directory, or 'inception' (local weights only)")
    e.add_argument("--inception-weights", help="torchvision inception_v3_google-*.pth (default: the "
                   "torch hub cache)")
    e.add_argument("-n", type=int, help="images per FID (default: the protocol's FID_N in "
                   "vaegan/evaluate.py, or the whole split when smaller)")
    e.add_argument("--split", help="held-out split (default: the protocol's, val)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default auto)")
    e.add_argument("--json", help="also write the report to this JSON file")
    t = p.add_argument_group("train-featurizer")
    t.add_argument("--label-key", help="an attribute (e.g. digit), several joined by ',', or 'all'")
    t.add_argument("--out", help="the featurizer directory to write")
    t.add_argument("--steps", type=int, help="training steps (default 500)")
    t.add_argument("--batch-size", type=int, default=64, help="default 64")
    t.add_argument("--kind", default="auto", choices=["auto", "softmax", "multilabel"],
                   help="auto: softmax for one integer label, multilabel for binary attributes")
    p.set_defaults(func=_eval)


def _data_prepare(args: argparse.Namespace) -> None:
    import warnings

    from vaegan.data import prepare

    def show(message, category, *_args, **_kw):  # one line per warning, like the errors
        print(f"vaegan: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        m = prepare(args.source, args.out, image_size=args.image_size, channels=args.channels,
                    shard_size=args.shard_size, image_format=args.format, seed=args.seed,
                    val_fraction=args.val_fraction, progress=not args.quiet, s3_endpoint=args.s3_endpoint)
    train, val = m["splits"]["train"], m["splits"]["val"]
    print(f"{args.out}: {train['samples']} train + {val['samples']} val samples in "
          f"{len(train['shards']) + len(val['shards'])} shards ({m['channels']}x{m['image_size']}x"
          f"{m['image_size']} {m['image_format']}, {len(m['attributes'])} attributes), "
          f"{m['skipped']} unreadable skipped")


def _data_check(args: argparse.Namespace) -> None:
    import json

    from vaegan.data import check_shards

    m = check_shards(args.shards, args.s3_endpoint)
    print(json.dumps({"shards": args.shards, "source": m["source"], "image_size": m["image_size"],
                      "channels": m["channels"], "attributes": m["attributes"],
                      **{split: s["samples"] for split, s in m["splits"].items()}}))


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="prepare and check WebDataset shards")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("prepare", help="write a source as train/val shards + manifest.json")
    p.add_argument("--source", required=True,
                   help="folder:PATH | celeba:PATH | mnist5k | synthetic-faces[:N] (default N 2000)")
    p.add_argument("--out", required=True,
                   help="a folder or s3://bucket/prefix (shards already there are replaced)")
    p.add_argument("--image-size", type=int, help="output height = width (default: 64; mnist5k 32)")
    p.add_argument("--channels", type=int, choices=[1, 3], help="default: the source's own")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--format", default="png", choices=["png", "jpg"], help="image encoding (default png)")
    p.add_argument("--seed", type=int, default=0, help="split and shuffle seed (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="held-out fraction (default 0.1; celeba uses its official partition)")
    p.add_argument("--s3-endpoint", default="", help="default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_data_prepare)
    c = data_sub.add_parser("check", help="pre-flight: the manifest reads and its shards exist")
    c.add_argument("--shards", required=True, help="a shard folder or s3://bucket/prefix")
    c.add_argument("--s3-endpoint", default="", help="default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL")
    c.set_defaults(func=_data_check)


def _bench_data(args: argparse.Namespace) -> None:
    import json

    from vaegan.data import bench_loader

    print(json.dumps(bench_loader(args.shards, workers=args.workers, batches=args.batches,
                                  batch_size=args.batch_size, split=args.split,
                                  s3_endpoint=args.s3_endpoint, cache_mb=args.cache_mb), indent=1))


def _add_bench(sub) -> None:
    """`vaegan bench ...`: one sub-command per benchmark."""
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    d = bench_sub.add_parser("data", help="decoded images per second of the shard reader (JSON)")
    d.add_argument("--shards", required=True, help="a shard folder or s3://bucket/prefix")
    d.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    d.add_argument("--batches", type=int, default=50, help="batches to time (default 50)")
    d.add_argument("--batch-size", type=int, default=64, help="default 64")
    d.add_argument("--split", default="train", choices=["train", "val"])
    d.add_argument("--s3-endpoint", default="", help="default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL")
    d.add_argument("--cache-mb", type=float, default=0,
                   help="each loader worker's decode cache, MiB, as data.decode_cache_mb "
                        "(default 0: decode every epoch)")
    d.set_defaults(func=_bench_data)
    st = bench_sub.add_parser("step", help="the training step vs a plain port of Algorithm 1 (JSON)")
    st.add_argument("--preset", default="celeba64", help="default celeba64 (the paper's 64x64)")
    _add_overrides(st)
    st.add_argument("--steps", type=int, default=5, help="timed steps per variant (default 5)")
    st.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    st.add_argument("--device", default="auto", help="auto (a GPU where there is one) | cpu | cuda[:N]")
    st.add_argument("--memory-format", choices=MEMORY_FORMATS, default="both",
                    help="the layouts timed: channels-last, contiguous (NCHW) or both (default)")
    st.set_defaults(func=_bench_step)
    tr = bench_sub.add_parser("train", help="end-to-end training (Ray, data, DDP, reports, checkpoints, "
                              "MLflow) beside the bare step, and where a step's time goes")
    tr.add_argument("--preset", default="mnist32", help="default mnist32 (the demo)")
    _add_overrides(tr)
    tr.add_argument("--workers", type=int, help="Ray Train workers (default 1)")
    tr.add_argument("--threads", type=int, help="CPUs (threads) per worker (default 2)")
    tr.add_argument("--layouts", metavar="WxT,...",
                    help="several layouts to compare, WORKERSxTHREADS each, e.g. 1x2,2x1 (instead of "
                         "--workers and --threads)")
    tr.add_argument("--rounds", type=int, default=1,
                    help="run every layout this many times, alternated, and give the medians (default 1)")
    tr.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    tr.add_argument("--warmup", type=int, default=20, help="first steps not counted (default 20)")
    tr.add_argument("--cpu-every", type=float, default=5.0, metavar="SECONDS",
                    help="seconds between looks at every process's CPU time (default 5; a short run "
                         "needs shorter, e.g. 0.5, or a worker can live between two looks)")
    tr.add_argument("--json", action="store_true",
                    help="print the report as JSON (with several runs: a line for each, then the medians)")
    tr.set_defaults(func=_bench_train)


MEMORY_FORMATS = {"both": (False, True), "channels-last": (True,), "contiguous": (False,)}
"""`vaegan bench step --memory-format`: which layouts (channels_last or not) are timed."""


def _bench_step(args: argparse.Namespace) -> None:
    import json

    from vaegan.bench import bench_step

    for row in bench_step(args.preset, args.overrides, steps=args.steps, warmup=args.warmup,
                          device=args.device, layouts=MEMORY_FORMATS[args.memory_format]):
        print(json.dumps(row), flush=True)


def _bench_train(args: argparse.Namespace) -> None:
    import json

    from vaegan import bench_train as bt

    options = {"steps": args.steps, "warmup": args.warmup, "cpu_every": args.cpu_every}
    if args.layouts is not None and (args.workers is not None or args.threads is not None):
        raise UserError(f"--layouts {args.layouts} names the workers and threads of each run; "
                        "leave out --workers and --threads")
    layouts = bt.parse_layouts(args.layouts) if args.layouts else [(args.workers or 1, args.threads or 2)]
    if len(layouts) == 1 and args.rounds == 1:
        (workers, threads), = layouts
        report = bt.bench_train(args.preset, args.overrides, workers=workers, threads=threads, **options)
        print(json.dumps(report) if args.json else bt.format_report(report), flush=True)
        return
    # several runs: a line for each as it ends (JSON lines, or text), then the medians
    def on_run(report: dict) -> None:
        print(json.dumps(report) if args.json else bt.format_run(report), flush=True)

    result = bt.bench_train_rounds(args.preset, args.overrides, layouts=layouts, rounds=args.rounds,
                                on_run=on_run, **options)
    summary = {k: v for k, v in result.items() if k != "runs"}
    print(json.dumps(summary) if args.json else bt.format_medians(result), flush=True)


def _models_tracking(args: argparse.Namespace) -> str:
    import mlflow

    from vaegan.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri or "")
    mlflow.set_tracking_uri(uri)
    return uri


def _models_load(args: argparse.Namespace):
    from vaegan.registry import load_model

    uri = _models_tracking(args)
    return load_model(args.uri, device=args.device, tracking_uri=uri)


def _models_list(args: argparse.Namespace) -> None:
    from vaegan.registry import client_for, list_versions

    rows = list_versions(client_for(_models_tracking(args)), args.name, metric=args.metric)
    if not rows:
        print("no registered models")
        return
    print(f"{'model':<28} {'ver':>4}  {'aliases':<22} {args.metric:>18}  {'attributes':<12} run")
    for r in rows:
        value = r[args.metric]
        print(f"{r['name']:<28} {r['version']:>4}  {','.join(r['aliases']) or '-':<22} "
              f"{'-' if value is None else f'{value:.4f}':>18}  {'yes' if r['attributes'] else '-':<12} "
              f"{r['run_id'] or '-'}")


def _models_promote(args: argparse.Namespace) -> None:
    from vaegan.registry import client_for, promote

    result = promote(client_for(_models_tracking(args)), args.name, args.source, args.target,
                     metric=args.metric, higher_is_better=args.higher_is_better, force=args.force)
    print(result.format())


def _models_sample(args: argparse.Namespace) -> None:
    import math

    from vaegan.images import save_grid

    x = _models_load(args).sample(args.n, seed=args.seed, latent=args.latent)
    print(save_grid(x, args.out, nrow=math.ceil(math.sqrt(args.n))))


def _models_reconstruct(args: argparse.Namespace) -> None:
    import torch

    from vaegan.images import save_grid

    model = _models_load(args)
    x = model.images(args.images)
    # Row 1 the inputs, row 2 their reconstructions Dec(mu(x)).
    print(save_grid(torch.cat([x, model.reconstruct(x)]), args.out, nrow=len(x)))


def _models_interpolate(args: argparse.Namespace) -> None:
    import torch

    from vaegan.images import save_grid

    model = _models_load(args)
    a, b = model.images(args.a), model.images(args.b)
    # a, then Dec of `steps` points on mu(a) -> mu(b), then b.
    print(save_grid(torch.cat([a, model.interpolate(a, b, args.steps), b]), args.out, nrow=args.steps + 2))


def _models_edit(args: argparse.Namespace) -> None:
    import torch

    from vaegan.attributes import parse_attributes
    from vaegan.images import save_grid

    model = _models_load(args)
    edits = parse_attributes(args.attr)
    x = model.images(args.images)
    # One row per image: input, reconstruction, edited reconstruction.
    rows = torch.stack([x, model.reconstruct(x), model.edit(x, edits)], dim=1).flatten(0, 1)
    print(save_grid(rows, args.out, nrow=3))


def _models_attributes(args: argparse.Namespace) -> None:
    import json

    from vaegan.attributes import ATTRIBUTE_IMAGES
    from vaegan.registry import register_attribute_version

    uri, model, report = register_attribute_version(
        args.uri, args.shards, featurizer=args.featurizer, max_images=args.max_images or ATTRIBUTE_IMAGES,
        eval_images=args.eval_images, strength=args.strength, name=args.name, alias=args.alias,
        experiment=args.experiment, featurizer_steps=args.featurizer_steps,
        tracking_uri=_models_tracking(args), device=args.device, s3_endpoint=args.s3_endpoint)
    counts = model.attribute_meta["counts"]
    print(f"attribute vectors from {model.attribute_meta['n_images']} training images: " + ", ".join(
        f"{a} ({counts[a]['with']} with)" for a in model.attribute_vectors))
    print(report.format())
    print(f"registered {uri}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"uri": uri, **report.to_dict()}, f, indent=2)


def _models_serve(args: argparse.Namespace) -> None:
    from vaegan.serve import serve

    _models_tracking(args)
    serve(args.uri, host=args.host, port=args.port, max_body_bytes=args.max_body_bytes,
          max_output_values=args.max_output_values, device=args.device)


def _add_models_serve(msub) -> None:
    """serve: the REST endpoint, with request limits (vaegan.serve)."""
    # Literal defaults: the parser imports no torch or MLflow (vaegan.serve and vaegan.pyfunc do).
    p = msub.add_parser("serve", help="REST endpoint (MLflow's scoring server) with request limits",
                        description="POST /invocations as with `mlflow models serve` (ops: see "
                        "vaegan/pyfunc.py); a body over --max-body-bytes gets a 413 before it is read, "
                        "a request for more than --max-output-values numbers a 400.")
    _models_common(p)
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (0.0.0.0 in a pod)")
    p.add_argument("--port", type=int, default=8080, help="default 8080")
    p.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024,
                   help="request body limit (default 33554432 = 32 MiB: ~128-256 RGB 64x64 images as JSON)")
    p.add_argument("--max-output-values", type=int, default=4 * 1024 * 1024,
                   help="numbers one answer may hold, e.g. op=sample n x C x H x W (default 4194304: "
                   "341 RGB 64x64 images)")
    p.set_defaults(func=_models_serve)


def _add_models(sub) -> None:
    """`vaegan models ...`: use and manage registered models (vaegan.inference, vaegan.registry)."""
    models = sub.add_parser(
        "models", help="use registered models: list, promote, sample, reconstruct, interpolate, edit, serve",
        description="URI: models:/NAME@ALIAS | models:/NAME/VERSION | models:/NAME/latest | "
                    "runs:/RUN_ID/model | a checkpoint folder. The registry is $MLFLOW_TRACKING_URI "
                    "(or --tracking-uri).")
    msub = models.add_subparsers(dest="models_command", required=True)
    _add_models_registry(msub)
    _add_models_images(msub)
    _add_models_attributes(msub)
    _add_models_serve(msub)


def _models_common(p: argparse.ArgumentParser, uri: bool = True) -> None:
    """What every `vaegan models` command takes: the registry, and (most) a model URI."""
    if uri:
        p.add_argument("uri", metavar="URI", help="the model (see `vaegan models -h`)")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default auto)")
    p.add_argument("--tracking-uri", default="", help="default: $MLFLOW_TRACKING_URI, else ./mlruns")


def _add_models_registry(msub) -> None:
    """list, promote: the registry's governance."""
    metric = COMPARE_METRIC
    common = _models_common
    p = msub.add_parser("list", help="registered models and versions, with aliases and a metric")
    p.add_argument("name", nargs="?", help="one registered model (default: all)")
    p.add_argument("--metric", default=metric, help=f"run metric to show (default {metric})")
    common(p, uri=False)
    p.set_defaults(func=_models_list)

    p = msub.add_parser("promote", help="move an alias to a version unless its metric is worse")
    p.add_argument("name", help="the registered model")
    p.add_argument("--from", dest="source", default="challenger",
                   help="alias or version number to promote (default challenger)")
    p.add_argument("--to", dest="target", default="champion", help="alias to move (default champion)")
    p.add_argument("--metric", default=metric,
                   help=f"run metric compared (default {metric}; lower is better)")
    p.add_argument("--higher-is-better", action="store_true", help="for metrics like eval_ssim_recon")
    p.add_argument("--force", action="store_true", help="promote even if worse or not comparable")
    common(p, uri=False)
    p.set_defaults(func=_models_promote)


def _add_models_images(msub) -> None:
    """sample, reconstruct, interpolate, edit: a PNG grid each."""
    common = _models_common
    p = msub.add_parser("sample", help="a PNG grid of samples Dec(z_p)")
    common(p)
    p.add_argument("-n", type=int, default=64, help="images (default 64)")
    p.add_argument("--seed", type=int, default=None, help="default: random")
    p.add_argument("--latent", choices=LATENTS, default="auto",
                   help="z_p from the prior N(0, I), or from the latent mixture fitted to the encoder's "
                        "codes (model.latent_mixture); auto (default): the mixture if the model has one")
    p.add_argument("-o", "--out", required=True, help="PNG file")
    p.set_defaults(func=_models_sample)

    p = msub.add_parser("reconstruct", help="inputs over their reconstructions, as a PNG grid")
    common(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (the model's size)")
    p.add_argument("-o", "--out", required=True, help="PNG file")
    p.set_defaults(func=_models_reconstruct)

    p = msub.add_parser("interpolate", help="A, decoded points of the line mu(A) -> mu(B), B")
    common(p)
    p.add_argument("a", metavar="A", help="image file")
    p.add_argument("b", metavar="B", help="image file")
    p.add_argument("--steps", type=int, default=8, help="points, ends included (default 8)")
    p.add_argument("-o", "--out", required=True, help="PNG file")
    p.set_defaults(func=_models_interpolate)

    p = msub.add_parser("edit", help="add/remove attributes: input, reconstruction, edit per row")
    common(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--attr", action="append", required=True, metavar="NAME=STRENGTH",
                   help="e.g. Eyeglasses=+1 (add) or Smiling=-1 (remove); repeatable")
    p.add_argument("-o", "--out", required=True, help="PNG file")
    p.set_defaults(func=_models_edit)


def _add_models_attributes(msub) -> None:
    common = _models_common
    p = msub.add_parser("attributes", help="compute attribute vectors, score edits, register a new version")
    common(p)
    p.add_argument("--shards", required=True, help="labelled shards (the manifest's attributes are used)")
    p.add_argument("--featurizer", help="attribute classifier dir (`vaegan eval train-featurizer --label-key "
                   "all`); default: train one on the shards")
    p.add_argument("--featurizer-steps", type=int, help="when training one (default 500)")
    p.add_argument("--max-images", type=int, help="training images for the vectors (default 10,000, "
                   "as the authors: vaegan.attributes.ATTRIBUTE_IMAGES)")
    p.add_argument("--eval-images", type=int, default=1000, help="held-out images edited (default 1000)")
    p.add_argument("--strength", type=float, default=1.0, help="edit strength scored (default 1)")
    p.add_argument("--name", help="registered model name (default: the URI's)")
    p.add_argument("--alias", help="point this alias at the new version")
    p.add_argument("--experiment", default="vaegan", help="for a model from a folder (default vaegan)")
    p.add_argument("--s3-endpoint", default="", help="default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL")
    p.add_argument("--json", help="also write the edit report to this JSON file")
    p.set_defaults(func=_models_attributes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vaegan", description="Train and use VAE/GAN models (Larsen et al. 2016).")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_config(sub)
    _add_train(sub)
    _add_tune(sub)
    _add_eval(sub)
    _add_data(sub)
    _add_bench(sub)
    _add_models(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line -> its arguments, with key=value overrides anywhere after the command:
    argparse alone takes them as one block only (`vaegan tune --trials 8 train.steps=5` would
    be refused, its `*` positional already matched empty before `--trials`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.func(args)
    except UserError as e:  # bad input: one clear line, no traceback
        print(f"vaegan: error: {redact_text(str(e))}", file=sys.stderr)  # messages name URIs
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
