"""The `vaegan` command. It parses arguments, then calls the library; nothing else.

    vaegan config show PRESET [key=value ...] [--config YAML] [--params]
"""

from __future__ import annotations

import argparse
import sys

from vaegan.config import PRESETS, ConfigError, load_config


def _config_show(args: argparse.Namespace) -> None:
    cfg = load_config(args.preset, args.config, args.overrides)
    print(cfg.to_yaml(), end="")
    if args.params:
        from vaegan.model import VAEGAN, dis_l_shape, param_count

        model = VAEGAN(cfg.model)
        print("# parameters")
        for name in ("encoder", "decoder", "discriminator"):
            print(f"#   {name:<14} {param_count(getattr(model, name)):>12,}")
        print(f"#   {'total':<14} {param_count(model):>12,}")
        c, h, w = dis_l_shape(cfg.model)
        print(f"# Dis_l: {c} x {h} x {w} = {c * h * w:,} features")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vaegan", description="Train and use VAE/GAN models (Larsen et al. 2016).")
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="inspect configs and presets")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print a preset's resolved config as YAML")
    show.add_argument("preset", help=f"one of: {', '.join(PRESETS)}")
    show.add_argument("overrides", nargs="*", metavar="key=value",
                      help="dotted overrides, e.g. loss.gamma=0.1")
    show.add_argument("--config", help="a YAML file applied before the overrides")
    show.add_argument("--params", action="store_true",
                      help="also print the parameter count of each network")
    show.set_defaults(func=_config_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as e:  # bad input: one clear line, no traceback
        print(f"vaegan: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
