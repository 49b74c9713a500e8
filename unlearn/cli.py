"""Command line: ``unlearn run RECIPE [--set key=value ...]``, ``unlearn eval SOURCE``,
``unlearn list [what]``, ``unlearn zoo list|build``, ``unlearn bench BENCH.yaml``,
``unlearn check-accelerate-config FILE``. See ``docs/cli.md``."""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys

import unlearn
from unlearn import distributed, zoo
from unlearn.trainer import TrainingDiverged


def _run(args) -> int:
    overrides = list(args.set or []) + (["output.resume=true"] if args.resume else [])
    res = unlearn.run(args.recipe, overrides=overrides, progress=not args.quiet)
    if not distributed.is_main():  # several processes: the main one reports
        return 0
    s = res.summary
    print(f"run written to {res.run_dir}")
    for line in res.headline_lines():
        print(line)
    print(f"  wall time {s['wall_seconds']} s; report: {res.run_dir / 'report.md'}")
    return 0


def _eval(args) -> int:
    res = unlearn.evaluate(args.source, args.task, recipe=args.recipe, overrides=args.set or [], output=args.out,
                           progress=not args.quiet)
    if not distributed.is_main():  # several processes: the main one reports
        return 0
    print(f"evaluated {res.recipe.model.source} on task {res.recipe.task.name}")
    for line in res.headline_lines():
        print(line)
    if res.out_dir is not None:
        print(f"  wall time {res.summary['wall_seconds']} s; metrics: {res.out_dir / 'metrics.json'}")
    else:
        print(json.dumps(res.summary, indent=1))
    return 0


def _list(args) -> int:
    # lazy: the registries import every task, method and attack (diffusers, transformers); --help,
    # `run` and `zoo` do not need them
    from unlearn.catalog import catalog, catalog_lines

    cat = catalog(args.what)
    print(json.dumps(cat, indent=1) if args.json else "\n".join(catalog_lines(cat)))
    return 0


def _bench(args) -> int:
    # lazy: the bench module loads recipes (torch, transformers); --help and the other commands do not need it
    from unlearn import bench

    say = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    res = bench.run(args.bench, jobs=args.jobs, dry_run=args.dry_run, out=args.out, progress=say)
    if args.dry_run:
        print("\n".join(bench.dry_run_lines(res)))
        return 0
    print(f"bench written to {res.out}: {len(res.cells)} cells, {res.ran} run now, "
          f"{sum(c.status == 'done' for c in res.cells)} done, {len(res.failed)} failed")
    for s in res.stale:
        print(f"  stale (recipe no longer in the bench, not used): {res.out / 'cells' / s}")
    for c in res.failed:
        print(f"  failed: {c.label} seed {c.seed} [{c.key}]: {c.error}")
    print(f"  leaderboard: {res.out / 'leaderboard.md'}")
    return 1 if res.failed else 0


def _check_accelerate_config(args) -> int:
    from unlearn.accelerate_configs import check_accelerate_config, notes

    c = check_accelerate_config(args.file)
    print(f"ok: {args.file} ({c.distributed_type.value}, {c.num_processes} processes"
          f"{', CPU' if c.use_cpu else ''})")
    for line in notes(c):
        print(f"  note: {line}")
    return 0


def _zoo(args) -> int:
    if args.zoo_cmd == "list":
        print("\n".join(zoo.listing_lines()))
        return 0
    if args.family not in zoo.FAMILIES:
        raise ValueError(f"unknown zoo family {args.family!r}; known: {', '.join(zoo.FAMILIES)}")
    import torch

    out = args.out or str(zoo.cache_dir() / "zoo" / args.family)
    if args.family == "tiny-t2i":
        # lazy: the zoo builders load only for `zoo build`, not for --help, `run` or `zoo list`
        from unlearn.zoo.build_t2i import build_t2i_zoo

        m = build_t2i_zoo(out)
        print(json.dumps({"out": out, "build_seconds": m["build_seconds"], "models": m["models"]}, indent=1))
        return 0
    if args.family == "tiny-latent-t2i":
        from unlearn.zoo.build_latent_t2i import build_latent_t2i_zoo

        m = build_latent_t2i_zoo(out, threads=args.threads)
        print(json.dumps({"out": out, "build_seconds": m["build_seconds"], "models": m["models"]}, indent=1))
        return 0
    torch.set_num_threads(args.threads)
    if args.family == "tiny-reader":
        # lazy: the zoo builders load only for `zoo build`, not for --help, `run` or `zoo list`
        from unlearn.zoo.build_reader import build_reader_model, build_reader_zoo, write_reader_manifest

        if args.part == "all":
            m = build_reader_zoo(out)
        elif args.part == "manifest":
            m = write_reader_manifest(out)
        else:
            rec = build_reader_model(args.part, out)
            print(json.dumps({"out": out, "part": args.part, "seconds": rec["seconds"], "models": rec["models"]}, indent=1))
            return 0
        print(json.dumps({"out": out, "build_seconds": m["build_seconds"], "models": m["models"]}, indent=1))
        return 0
    # lazy: the zoo builders load only for `zoo build`, not for --help, `run` or `zoo list`
    from unlearn.zoo.build import build_family, build_part, spec_for, write_manifest

    if args.part == "all":
        m = build_family(out, spec_for(args.family))
    elif args.part == "manifest":
        m = write_manifest(out, spec_for(args.family))
    else:
        rec = build_part(args.part, out, spec_for(args.family))
        print(json.dumps({"out": out, "part": args.part, "seconds": rec["seconds"], "models": rec["models"]}, indent=1))
        return 0
    print(json.dumps({"out": out, "build_seconds": m["build_seconds"], "models": m["models"]}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="unlearn", description="Make trained models forget, and measure it.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a recipe")
    r.add_argument("recipe", help="path to a recipe YAML")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    r.add_argument("--resume", action="store_true",
                   help="continue the killed run of output.dir from its last complete checkpoint")
    e = sub.add_parser("eval", help="evaluate a model on a task's suite, without unlearning it")
    e.add_argument("source", help="zoo:<family>/<name>, a model directory (e.g. a run's checkpoint/), a single-file "
                                  "Stable Diffusion checkpoint (*.safetensors next to its pipeline's configs) or a hub id")
    e.add_argument("--task", help="the task (see `unlearn list tasks`); default: the recipe's, else the one for the "
                                  "model's modality (an image model: visual), else tofu")
    e.add_argument("--recipe", metavar="FILE",
                   help="a recipe YAML whose task and eval settings to use (its method is not applied)")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    e.add_argument("--out", metavar="DIR", help="write metrics.json, provenance.json and recipe.yaml to DIR "
                                                "(default: print the summary as JSON)")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    ls = sub.add_parser("list", help="methods, selections, suites, attacks, probes, tasks and zoo models")
    ls.add_argument("what", nargs="?", metavar="WHAT",
                    help="one section: methods, selections, suites, attacks, probes, tasks or zoo (default: all)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    z = sub.add_parser("zoo", help="the tiny model zoo")
    zs = z.add_subparsers(dest="zoo_cmd", required=True)
    zs.add_parser("list", help="list zoo models and where they are")
    b = zs.add_parser("build", help="train a zoo family deterministically")
    b.add_argument("family", nargs="?", default="tiny-llama")
    b.add_argument("--out", help="output directory (default: the user cache)")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--part", default="all", choices=["all", "base", "retain", "target", "retain90", "manifest"],
                   help="build one part (base first; then retain and target can run in parallel; then manifest). "
                        "tiny-reader: target or retain90 (in parallel), then manifest")
    bn = sub.add_parser("bench", help="a grid of recipes (methods x seeds x a sweep), with resume and a leaderboard")
    bn.add_argument("bench", help="path to a bench YAML (docs/bench.md)")
    bn.add_argument("--jobs", type=int, default=1, help="cells run at the same time, one process each (default 1)")
    bn.add_argument("--dry-run", action="store_true", help="list the cells and their status; run nothing")
    bn.add_argument("--out", metavar="DIR", help="the bench directory (default: the file's out, else runs/bench/<name>)")
    bn.add_argument("-q", "--quiet", action="store_true", help="no line per finished cell")
    ck = sub.add_parser("check-accelerate-config", help="check an accelerate launch config file (keys and values)")
    ck.add_argument("file", help="an `accelerate launch --config_file` YAML, e.g. one of unlearn/accelerate_configs/")
    args = p.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)  # a scheduler's SIGTERM cleans up like Ctrl-C
    try:
        return {"run": _run, "eval": _eval, "list": _list, "zoo": _zoo, "bench": _bench,
                "check-accelerate-config": _check_accelerate_config}[args.cmd](args)
    except TrainingDiverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # every input check (recipes, data, models, output directories)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `unlearn list | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # I/O: permissions, a full disk, a missing or unreadable file
        print(f"error: {_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the run was not written (a complete training checkpoint, if any, is kept for --resume)", file=sys.stderr)
        return 130
    except _Terminated:
        print("terminated (SIGTERM); the run was not written (a complete training checkpoint, if any, is kept for "
              "--resume)", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """SIGTERM, raised where the process is, so that the run's clean-up runs."""


def _terminate(signum, frame):
    raise _Terminated()


def _os_error(e: OSError) -> str:
    """One line for an OSError: what failed, on which file, and a hint for the common causes."""
    what = e.strerror or str(e).splitlines()[0]
    files = " -> ".join(repr(str(f)) for f in (e.filename, getattr(e, "filename2", None)) if f)
    hint = {errno.ENOSPC: "free some space or choose another output.dir",
            errno.EACCES: "check the permissions, or choose another output.dir",
            errno.EROFS: "the file system is read-only: choose another output.dir",
            errno.EDQUOT: "the disk quota is exhausted: free some space"}.get(e.errno, "")
    return f"{what}: {files}" + (f"; {hint}" if hint else "") if files else what + (f"; {hint}" if hint else "")


if __name__ == "__main__":
    sys.exit(main())
