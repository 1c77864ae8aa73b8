"""leq.py's upstream stages (support code, not LEQ's algorithm): find or make world_model.npz and
pretrain.npz for a LEQ run, and check the dataset, the world model, the pretrained networks and
the checkpoint being resumed against each other before any training."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from leq_utils import artifacts, tasks


def nested(resolve, stage_args, prefix: str, settings):
    """A stage's own flag checks on leq.py's nested settings, its one-line errors naming the flag
    as leq.py takes it (--world-model-settings.num-elites, not --num-elites)."""
    try:
        return resolve(stage_args)
    except tasks.InputError as e:
        message = str(e)
        for field in dataclasses.fields(settings):
            flag = field.name.replace("_", "-")
            message = re.sub(rf"(?<![\w.-])--{re.escape(flag)}(?![\w-])", f"--{prefix}.{flag}", message)
        raise tasks.InputError(message) from None


def given_settings(settings) -> dict:
    """The nested settings given on the command line: those that differ from their defaults."""
    default = dataclasses.asdict(type(settings)())
    return {k: v for k, v in dataclasses.asdict(settings).items() if v != default[k]}


def note_other_settings(path: Path, flag: str, wanted: dict) -> None:
    """One line when an existing upstream artifact was made with other values of the `wanted`
    settings (the --<flag>.* apply only to an artifact leq.py makes)."""
    recorded = artifacts.recorded_config(path)
    diff = [f"{k} {recorded.get(k)} (not {v})" for k, v in json.loads(json.dumps(wanted)).items() if recorded.get(k) != v]
    if diff:
        print(f"[leq] note: using the existing {path} as it is, made with {', '.join(diff)}; --{flag}.* "
              f"apply only to an artifact leq.py makes (delete this one to make it so)")


def prepare(task: tasks.Task, args, resume, world_model, pretrain) -> tuple:
    """What a later stage (leq.py, its Args `args`) starts from: the dataset, world_model.npz and
    pretrain.npz, checked against each other and against the checkpoint being resumed BEFORE
    any training. A missing stage runs first, with leq.py's task, data and seed, its nested
    --world-model-settings.* / --pretrain-settings.* and its flags checked up front, unless the
    checkpoint was made from the file that is missing. An existing one is used as it is, with a
    note where it differs from the nested settings given, or, at the default path (leq.py's own),
    from all of them (e.g. the shrunk stages of a smoke run). resume: None or (checkpoint path,
    its arrays). Returns (dataset, world model, pretrain path or None, fingerprints). world_model and
    pretrain: the stage modules (passed in: the support package never imports a stage)."""
    ckpt, saved = resume or (None, {"meta/inputs": {}})
    recorded = saved["meta/inputs"] or {}
    common = dict(env=args.env, dataset_path=args.dataset_path, data_dir=args.data_dir, seed=args.seed)
    wm_path = world_model.path_or_default(args.world_model, args.env, args.seed)
    pt_path = None if args.no_pretrain else pretrain.path_or_default(args.pretrain, args.env, args.seed)
    wm_settings, pt_settings = args.world_model_settings, args.pretrain_settings
    wm_args = nested(world_model.resolve, world_model.Args(**common, **dataclasses.asdict(wm_settings), out=str(wm_path),
                                                           learn_termination=getattr(args, "learned_termination", False)),
                     "world-model-settings", wm_settings)
    pt_args = nested(pretrain.resolve, pretrain.Args(**common, **dataclasses.asdict(pt_settings), world_model=str(wm_path),
                                                     out=str(pt_path)), "pretrain-settings", pt_settings)
    stages = (("world_model", wm_path, args.world_model, wm_settings, wm_args),
              ("pretrain", pt_path, args.pretrain, pt_settings, pt_args))
    loaded = {}
    for name, path, flag, settings, stage_args in stages:
        if path and not path.exists() and (flag or recorded.get(name)):
            raise tasks.InputError(f"--{name.replace('_', '-')} {path} does not exist" if flag else
                                   f"checkpoint {ckpt} was made from the {name.replace('_', ' ')} "
                                   f"{recorded[name]['path']}, but {path} does not exist: restore it, or start "
                                   f"over in another --run-dir")
        if path and path.exists():  # env, dims, shapes; and what it was made with
            loaded[name] = (world_model.load_world_model if name == "world_model" else pretrain.load_pretrained)(path, task)
            note_other_settings(path, f"{name.replace('_', '-')}-settings", given_settings(settings) if flag else
                                {k: getattr(stage_args, k) for k in dataclasses.asdict(settings)})
    ds = tasks.load_dataset(task, args.dataset_path, args.data_dir)
    inputs = {"dataset": artifacts.file_fingerprint(ds.path, [recorded.get("dataset")])}
    remedy = "restore the files it was made from, or start over in another --run-dir"

    def announce(path: Path, name: str, settings) -> None:
        flags = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, tuple) else v}"
                         for k, v in given_settings(settings).items())
        print(f"[leq] no {path.name} at {path}: running {name}.py {flags or 'with its defaults'}")

    if not wm_path.exists():
        announce(wm_path, "world_model", wm_settings)
        world_model.train(wm_args)
    wm = loaded.get("world_model") or world_model.load_world_model(wm_path, task)
    inputs["world_model"] = world_model.check_dataset(wm, wm_path, ds, inputs["dataset"])
    if ckpt:
        artifacts.check_inputs(f"checkpoint {ckpt}", saved["meta/inputs"], inputs, remedy)
    if pt_path and not pt_path.exists():
        announce(pt_path, "pretrain", pt_settings)
        pretrain.train(pt_args)
    if pt_path:
        inputs["pretrain"], made_from = artifacts.provenance(pt_path)
        artifacts.check_inputs(f"pretrain {pt_path}", made_from, {k: inputs[k] for k in ("dataset", "world_model")},
                               f"pass the pretrain.npz made from them, or rerun pretrain.py --world-model {wm_path}")
        if ckpt:
            artifacts.check_inputs(f"checkpoint {ckpt}", recorded, {"pretrain": inputs["pretrain"]}, remedy)
    return ds, wm, pt_path, inputs
