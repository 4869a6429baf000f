"""The executors of a sweep: each run as a main_clip.py process here, one at a time or one per
group of visible GPUs (`execute_local`), in this process (`execute_debug`), or as one task of a
SLURM job array through submitit (`execute_slurm`, `SweepTask`: requeued on preemption, it resumes
from the run's own last.pt).
"""
from __future__ import annotations

import ctypes
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from config import REPO_ROOT, one_line
from sweep_grid import RunSpec
from sweep_state import Outcome, plan, run_argv


class _ErrorLines(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.lines = []

    def emit(self, record):
        self.lines += [line for line in self.format(record).splitlines() if line.strip()]


def run_in_process(argv: list[str]) -> tuple[int, str]:
    """main_clip.main in this process; (exit status, its last error line)."""
    import main_clip
    from distributed import log

    catcher = _ErrorLines()
    log.addHandler(catcher)
    try:
        rc = main_clip.main(list(argv))
    finally:
        log.removeHandler(catcher)
    return rc, (catcher.lines[-1] if catcher.lines else '')


def last_error_line(log_path: Path, start: int = 0) -> str:
    """The last 'error:' line a run printed after byte `start` of its log (else its last line)."""
    try:
        with open(log_path, 'rb') as handle:
            handle.seek(start)
            text = handle.read().decode('utf-8', 'replace')
    except OSError:
        return ''
    lines = [line.strip() for line in text.replace('\r', '\n').splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('error:') or 'Error' in line.split(':')[0]]
    return (errors or lines or [''])[-1]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the sweep process dies, however it dies (Linux
    prctl PR_SET_PDEATHSIG), so that a killed sweep leaves no run behind holding its folder."""
    try:
        ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def visible_gpus() -> list[str]:
    """The GPU ids this process may use (CUDA_VISIBLE_DEVICES order), [] without CUDA."""
    env = os.environ.get('CUDA_VISIBLE_DEVICES')
    if env is not None:
        return [g.strip() for g in env.split(',') if g.strip() and g.strip() != '-1']
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def local_command(argv: list[str], gpus_per_run: int, python: str) -> list[str]:
    script = str(REPO_ROOT / 'main_clip.py')
    if gpus_per_run > 1:  # one process group per run (docs/distributed.md)
        return [python, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={gpus_per_run}',
                script, *argv]
    return [python, script, *argv]


def execute_local(work: list, sweep_dir: Path, *, gpus_per_run: int = 1, python: str = sys.executable,
                  say=print) -> list[Outcome]:
    """Each run a main_clip.py process, its output in <sweep_dir>/logs/<name>.log; one at a time,
    or one per group of gpus_per_run visible GPUs at once."""
    gpus = visible_gpus()
    slots = [gpus[i:i + gpus_per_run] for i in range(0, len(gpus) - gpus_per_run + 1, gpus_per_run)] or [None]
    logs = sweep_dir / 'logs'
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, outcomes = list(work), {}, []
    while pending or running:
        free = [i for i in range(len(slots)) if i not in running]
        while pending and free:
            spec, action = pending.pop(0)
            slot = free.pop(0)
            env = dict(os.environ)
            if slots[slot] is not None:
                env['CUDA_VISIBLE_DEVICES'] = ','.join(slots[slot])
            log_path = logs / f'{spec.name}.log'
            handle = open(log_path, 'ab')
            start = handle.tell()
            command = local_command(run_argv(spec, action), gpus_per_run, python)
            handle.write(f'\n$ {shlex.join(command)}\n'.encode())
            handle.flush()
            say(f'{"resume" if action.kind == "resume" else "start"} {spec.name}'
                + (f' on GPU {",".join(slots[slot])}' if slots[slot] else '') + f' (log: {log_path})')
            try:
                process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
                                           preexec_fn=_die_with_parent if sys.platform.startswith('linux') else None)
            except OSError as e:  # the interpreter or torchrun cannot be started
                handle.close()
                outcomes.append(Outcome(spec, 'failed', f'cannot start {command[0]}: {e.strerror or e}'))
                continue
            running[slot] = (spec, action, process, handle, log_path, start)
        time.sleep(0.2)
        for slot, (spec, action, process, handle, log_path, start) in list(running.items()):
            if process.poll() is None:
                continue
            handle.close()
            del running[slot]
            if process.returncode == 0:
                outcomes.append(Outcome(spec, 'resumed' if action.kind == 'resume' else 'started'))
            else:
                outcomes.append(Outcome(spec, 'failed', last_error_line(log_path, start)
                                        or f'exit status {process.returncode}'))
            say(f'{outcomes[-1].kind} {spec.name}' + (f': {outcomes[-1].error}' if outcomes[-1].error else ''))
    return outcomes


def execute_debug(work: list, sweep_dir: Path, say=print) -> list[Outcome]:
    """Each run in this process, one after another (for tests and debugging)."""
    outcomes = []
    for spec, action in work:
        say(f'{"resume" if action.kind == "resume" else "start"} {spec.name} (in process)')
        rc, error = run_in_process(run_argv(spec, action))
        if rc == 130:  # Ctrl-C reached the run (main_clip returns 130): it stops the sweep, not just this run
            raise KeyboardInterrupt
        kind = 'failed' if rc != 0 else ('resumed' if action.kind == 'resume' else 'started')
        outcomes.append(Outcome(spec, kind, error or (f'exit status {rc}' if rc else '')))
        say(f'{kind} {spec.name}' + (f': {outcomes[-1].error}' if kind == 'failed' else ''))
    return outcomes


class SweepTask:
    """What one SLURM array task runs: the run of its RunSpec, decided from its folder at the time
    the task starts (so a requeued task resumes from its own last.pt, and a finished one is
    skipped). submitit calls `checkpoint` on preemption or timeout (SIGUSR2) and requeues the
    DelayedSubmission it returns: the same task, which then finds last.pt and resumes."""

    def __call__(self, spec: RunSpec) -> dict:
        if os.environ.get('SUBMITIT_EXECUTOR') == 'slurm' and int(os.environ.get('SLURM_NTASKS', '1')) > 1:
            # A multi-GPU cell: one srun task per GPU, joined into one process group through the
            # address submitit derives from the job (main_clip reads SLURM_PROCID / SLURM_NTASKS).
            import submitit.helpers

            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        action = plan(spec)
        if action.kind == 'done':
            return {'run': spec.name, 'outcome': 'done', 'error': ''}
        if action.kind == 'refuse':
            return {'run': spec.name, 'outcome': 'refused', 'error': action.why}
        rc, error = run_in_process(run_argv(spec, action))
        outcome = 'failed' if rc else ('resumed' if action.kind == 'resume' else 'started')
        return {'run': spec.name, 'outcome': outcome, 'error': error or (f'exit status {rc}' if rc else '')}

    def checkpoint(self, spec: RunSpec):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, spec)  # the run's own last.pt is the checkpoint


SLURM_FLAGS = {  # sweep.py flag -> submitit SlurmExecutor parameter
    'partition': 'partition', 'time': 'time', 'gpus_per_node': 'gpus_per_node', 'cpus_per_task': 'cpus_per_task',
    'mem_gb': 'mem', 'nodes': 'nodes', 'account': 'account', 'qos': 'qos', 'constraint': 'constraint',
    'exclude': 'exclude', 'array_parallelism': 'array_parallelism', 'job_name': 'job_name',
}


def slurm_executor(args, folder: Path):
    """submitit's SlurmExecutor with the sweep's flags: one job array, `--requeue` so that a
    preempted or timed-out task goes back to the queue, and one srun task per GPU of a cell."""
    import submitit

    executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=args.max_requeues)
    params = {target: getattr(args, name) for name, target in SLURM_FLAGS.items() if getattr(args, name) is not None}
    if 'mem' in params:  # sbatch --mem takes a unit
        gb = float(params['mem'])
        params['mem'] = f'{int(gb)}GB' if gb.is_integer() else f'{int(gb * 1024)}MB'
    gpus = params.get('gpus_per_node') or 0
    if not gpus:
        params.pop('gpus_per_node', None)  # --gpus-per-node 0: a CPU-only task
    params['ntasks_per_node'] = max(1, gpus)   # each task one process of the run's group (srun)
    params['additional_parameters'] = {'requeue': True}
    # The job unpickles sweep_executors.SweepTask and sweep_grid.RunSpec: the repository must be
    # importable wherever it starts.
    params['setup'] = list(args.slurm_setup or []) + [f'export PYTHONPATH={shlex.quote(str(REPO_ROOT))}'
                                                      '${PYTHONPATH:+:$PYTHONPATH}']
    executor.update_parameters(**params)
    return executor


def execute_slurm(work: list, sweep_dir: Path, args, say=print) -> list[Outcome]:
    """One job array of every run that is not finished; with --wait, the tasks' outcomes."""
    folder = Path(args.slurm_folder or sweep_dir / 'slurm')
    executor = slurm_executor(args, folder)
    specs = [spec for spec, _ in work]
    jobs = executor.map_array(SweepTask(), specs)
    array_id = jobs[0].job_id.split('_')[0] if jobs else '?'
    say(f'submitted job array {array_id}: {len(jobs)} tasks (sbatch script and logs in {folder})')
    if not args.wait:
        return [Outcome(spec, 'submitted') for spec in specs]
    outcomes = []
    for spec, job in zip(specs, jobs):
        try:
            result = job.result()
            outcomes.append(Outcome(spec, result['outcome'], result.get('error', '')))
        except Exception as e:  # the task died: submitit's error names it
            outcomes.append(Outcome(spec, 'failed', one_line(e)[:300]))
    return outcomes
