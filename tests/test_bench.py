"""Every script of bench/ runs, through its real entry point (main(argv)), at tiny sizes: it prints its
result lines, and every ratio it prints is the quotient of the times (or rates) it printed, to the
printed precision. An interface change of the code the benches call breaks these tests, not a bench
found broken months later (bench_speed.py called the pseudo-label source with the signature it had
before AEVLP added `batch`; no test noticed).

No timing is asserted: the machine is shared and the sizes are tiny."""
from __future__ import annotations

import re
from decimal import Decimal

import pytest
import torch

from bench import (bench_aevlp, bench_ddp_step, bench_heads, bench_loader, bench_metrics, bench_seed_backbones,
                   bench_speed, gpu_figures, sgre_memory)

NUMBER = r'[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?'


def half_unit(text: str) -> float:
    """Half the last printed digit's unit: '0.0123' -> 0.00005, '2188' -> 0.5, '1.2e-05' -> 5e-07."""
    return float(Decimal(1).scaleb(Decimal(text).as_tuple().exponent) / 2)


def assert_quotient(ratio: str, numerator: str, denominator: str) -> None:
    """The printed ratio is numerator / denominator as printed, within the rounding of all three."""
    n, d, r = float(numerator), float(denominator), float(ratio)
    lo = (n - half_unit(numerator)) / (d + half_unit(denominator))
    hi = (n + half_unit(numerator)) / (d - half_unit(denominator))
    assert lo - half_unit(ratio) <= r <= hi + half_unit(ratio), (ratio, numerator, denominator)


def test_assert_quotient_catches_a_ratio_of_other_times():
    assert_quotient('2.00', '4.0', '2.0')
    assert_quotient('2188.17', '2.756', '0.00126')  # 2.756 / 0.00126 = 2187.3; 0.00126 is 0.001255 to 0.001265
    with pytest.raises(AssertionError):
        assert_quotient('2.10', '4.0', '2.0')
    with pytest.raises(AssertionError):
        assert_quotient('3.0', '4.0', '2.0')


def spread_of(text: str) -> list[str]:
    """'min / median / max' -> the three printed numbers."""
    values = [v.strip() for v in text.split('/')]
    assert len(values) == 3 and all(re.fullmatch(NUMBER, v) for v in values), text
    assert float(values[0]) <= float(values[1]) <= float(values[2]), text
    return values


def machine_header(out: str) -> None:
    assert re.search(r'^machine: .+, \d+ CPUs, \d+ torch threads; device cpu', out, re.M), out
    assert re.search(rf'^load average at start: {NUMBER} / {NUMBER} / {NUMBER}', out, re.M), out


def markdown_rows(out: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip('|').split('|')] for line in out.splitlines()
            if line.startswith(f'| {first_cell}')]


def test_machine_lines_warn_when_the_machine_is_busy(monkeypatch):
    from bench import common
    monkeypatch.setattr(common, 'cpu_count', lambda: 2)
    monkeypatch.setattr(common, 'load_average', lambda: (0.4, 0.3, 0.2))
    quiet = common.machine_lines()
    assert len(quiet) == 2 and '0.40 / 0.30 / 0.20' in quiet[1] and 'on 2 CPUs' in quiet[1]
    monkeypatch.setattr(common, 'load_average', lambda: (3.5, 2.0, 1.0))
    busy = common.machine_lines()
    assert len(busy) == 3 and busy[2].startswith('WARNING: the machine is busy (load 3.50 on 2 CPUs)')


def test_bench_speed_every_section(capsys):
    assert bench_speed.main(['--clip-model', 'vlpl-demo-tiny', '--model', 'small_cnn', '--image-size', '32',
                             '--batch-size', '2', '--steps', '2', '--metrics-rows', '60',
                             '--sections', 'train,eval,metrics,parts,overhead']) == 0
    out = capsys.readouterr().out
    machine_header(out)
    assert 'classifier small_cnn at 32 px, frozen CLIP vlpl-demo-tiny' in out
    assert 'pseudo-labels of the batch, cached vs online: equal' in out
    rows = {}
    for section, label, median, speed_up, _target, runs in markdown_rows(out, 'train') + markdown_rows(out, 'eval') \
            + markdown_rows(out, 'metrics') + markdown_rows(out, 'parts') + markdown_rows(out, 'overhead'):
        assert spread_of(runs)[1] == median  # the median column is the median of the runs
        rows.setdefault(section, []).append((label, median, speed_up))
    assert [label.split(':')[0] for label, _, _ in rows['train']] == ['original', 'ours']
    assert [label.split(':')[0] for label, _, _ in rows['eval']] == ['original', 'ours']
    assert len(rows['metrics']) == 2 and len(rows['parts']) == 4
    for section in ('train', 'eval', 'metrics'):
        base = rows[section][0][1]
        assert rows[section][0][2] == '1.00x'
        for _, median, speed_up in rows[section][1:]:
            assert_quotient(speed_up.rstrip('x'), base, median)
    assert all(speed_up == '' for _, _, speed_up in rows['parts'] + rows['overhead'])
    assert re.search(r'^parts: CLIP embed / classifier step = ', out, re.M)
    engine_train, bare_train, engine_eval, bare_eval = (float(median) for _, median, _ in rows['overhead'])
    added = re.search(rf'the engine adds ({NUMBER}) ms to a training step and ({NUMBER}) ms to an evaluation', out)
    assert abs(float(added.group(1)) - 1e3 * (engine_train - bare_train)) <= 1e3 * 1e-3 * engine_train + 5e-4
    assert abs(float(added.group(2)) - 1e3 * (engine_eval - bare_eval)) <= 1e3 * 1e-3 * engine_eval + 5e-4


def test_bench_speed_rows_of_amp_and_a_compile_that_fails(capsys, monkeypatch):
    """--amp adds its rows; a compilation that fails is a row that says so, the others are timed."""
    class NoCompiler(torch.nn.Module):  # torch.compile's module fails at its first call, as here
        def forward(self, *args, **kwargs):
            raise RuntimeError('no C++ compiler found\nmore')
    monkeypatch.setattr(bench_speed, 'compile_model', lambda model, args: NoCompiler())
    assert bench_speed.main(['--clip-model', 'vlpl-demo-tiny', '--model', 'small_cnn', '--image-size', '32',
                             '--batch-size', '2', '--steps', '1', '--sections', 'train', '--amp', '--compile']) == 0
    rows = markdown_rows(capsys.readouterr().out, 'train')
    labels = [r[1] for r in rows]
    assert labels[2].startswith('ours: online CLIP, --amp --channels-last (--amp: no-op on CPU)')
    assert labels[3].startswith('ours: cached, --amp --channels-last')
    assert rows[4][2] == '' and rows[4][5] == 'skipped: compilation failed: RuntimeError: no C++ compiler found'
    for row in rows[1:4]:
        assert_quotient(row[3].rstrip('x'), rows[0][2], row[2])


def test_bench_loader_pipelines_ratios_and_profile(capsys):
    assert bench_loader.main(['--images', '12', '--source-size', '40x30', '--image-size', '24', '--batch-size', '4',
                              '--num-workers', '1', '--passes', '2', '--no-step', '--profile-images', '8']) == 0
    out = capsys.readouterr().out
    machine_header(out)
    medians = {}
    for name, workers, rates, cpu_ms in [r for r in markdown_rows(out, 'PIL') + markdown_rows(out, 'packed')
                                         if len(r) == 4]:
        medians[name] = spread_of(rates)[1]
        assert float(cpu_ms) > 0
    assert list(medians) == ['PIL', 'packed', 'packed, main process']
    ratios = re.findall(rf'^ratio (.+) / PIL \(medians\): ({NUMBER}) / ({NUMBER}) = ({NUMBER})x', out, re.M)
    assert [r[0] for r in ratios] == ['packed', 'packed, main process']
    for name, numerator, denominator, ratio in ratios:
        assert (numerator, denominator) == (medians[name], medians['PIL'])
        assert_quotient(ratio, numerator, denominator)
    assert 'tensors bit-identical across the pipelines over all 12 images' in out
    stages = [r for r in markdown_rows(out, 'PIL |') + markdown_rows(out, 'packed |') if len(r) == 3]
    stage_names = [s[1] for s in stages]
    assert any(s.startswith('decode') for s in stage_names) and any(s.startswith('resize') for s in stage_names)
    assert any('byte-table lookup' in s for s in stage_names)
    assert all(float(s[2]) >= 0 for s in stages)
    assert re.search(r'^ceiling on \d+ CPUs', out, re.M)


def test_bench_metrics(capsys):
    assert bench_metrics.main(['--num-images', '80', '--num-classes', '5', '--repeats', '3']) == 0
    out = capsys.readouterr().out
    machine_header(out)
    fast = re.search(rf'vectorised compute_metrics: ({NUMBER}) s \(median of 3; min / median / max (.+)\)', out)
    assert fast and spread_of(fast.group(2))[1] == fast.group(1)
    slow = re.search(rf'per-image loop reference: +({NUMBER}) s', out).group(1)
    ratio = re.search(rf'speed-up: ({NUMBER}) / ({NUMBER}) = ({NUMBER})x', out)
    assert ratio.group(1, 2) == (slow, fast.group(1))
    assert_quotient(ratio.group(3), slow, fast.group(1))
    assert '(agree)' in out


def test_bench_ddp_step_plain_and_wrapped_in_one_process(capsys):
    assert bench_ddp_step.main(['--ddp', '--steps', '2', '--rounds', '2', '--warmup', '1', '--batch-size', '4',
                                '--image-size', '16']) == 0
    out = capsys.readouterr().out
    machine_header(out)
    medians = {m.group(1): spread_of(m.group(2))[1]
               for m in re.finditer(r'^(plain|DDP \(process group of one\)): (.+) ms per step', out, re.M)}
    assert list(medians) == ['plain', 'DDP (process group of one)']
    ratio = re.search(rf'DDP / plain \(medians\) = ({NUMBER}) / ({NUMBER}) = ({NUMBER})x', out)
    assert ratio.group(1, 2) == (medians['DDP (process group of one)'], medians['plain'])
    assert_quotient(ratio.group(3), ratio.group(1), ratio.group(2))
    assert not torch.distributed.is_initialized()  # the process group of one is gone again


def test_bench_heads(capsys):
    assert bench_heads.main(['--channels', '16', '--grid', '2', '--classes', '3', '--steps', '1', '--warmup', '0',
                             '--batch', '1', '--q2l-hidden', '8', '--feedforward', '16', '--att-dim', '8']) == 0
    out = capsys.readouterr().out
    machine_header(out)
    for name in bench_heads.HEAD_NAMES:
        assert re.search(rf'^{name} +{NUMBER} M params  forward\+backward +{NUMBER} ms$', out, re.M), name


def test_bench_aevlp(capsys):
    assert bench_aevlp.main(['--batch', '2', '--grid', '1', '--classes', '3', '--steps', '1', '--warmup', '0',
                             '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    machine_header(out)
    ms = dict(re.findall(rf'^(fp32|fp16): ({NUMBER}) ms per step', out, re.M))
    ratio = re.search(rf'fp16 / fp32 time: ({NUMBER}) / ({NUMBER}) = ({NUMBER})', out)
    assert ratio.group(1, 2) == (ms['fp16'], ms['fp32'])
    assert_quotient(ratio.group(3), ms['fp16'], ms['fp32'])


def test_bench_seed_backbones(capsys):
    assert bench_seed_backbones.main(['--rows', 'small_cnn', '--heads', 'linear,q2l,sgre', '--image-size', '32',
                                      '--batch-size', '2', '--steps', '1', '--warmup', '0', '--head-width', '16']) == 0
    out = capsys.readouterr().out
    machine_header(out)
    rows = markdown_rows(out, 'small_cnn')
    assert [r[1] for r in rows] == ['linear', 'q2l', 'sgre']
    for row in rows:
        assert_quotient(row[6], '2000', row[5])  # images/s = batch / (ms / 1000)


def test_sgre_memory(capsys):
    threads = torch.get_num_threads()
    assert sgre_memory.main(['--classes', '2', '--tokens', '4', '--dim', '8', '--embed-dim', '4', '--att-dim', '16',
                             '--chunk-classes', '1']) == 0
    assert torch.get_num_threads() == threads  # its two threads are this run's only
    out = capsys.readouterr().out
    found = re.findall(rf'^(plain|fused|chunked) +kept for backward +({NUMBER}) copies +peak forward\+backward '
                       rf'+({NUMBER}) copies', out, re.M)
    assert [f[0] for f in found] == ['plain', 'fused', 'chunked']
    assert all(0 < float(kept) <= float(peak) for _, kept, peak in found)


def test_gpu_figures_on_the_cpu_runs_every_section_tiny_and_says_so(tmp_path, capsys):
    out_file = tmp_path / 'figures.md'
    assert gpu_figures.main(['--out', str(out_file)]) == 0
    out = capsys.readouterr().out
    assert out_file.read_text() == out
    assert out.startswith('# VLPL figures: NO GPU here, tiny sizes on the CPU')
    rows = markdown_rows(out, 'train') + markdown_rows(out, 'eval') + markdown_rows(out, 'loader') \
        + markdown_rows(out, 'ddp') + markdown_rows(out, 'compile')
    sections = {}
    for section, variant, median, unit, runs, ratio, memory, note in rows:
        assert 'skipped' not in note and 'failed' not in note, (section, note)
        assert memory == 'n/a (CPU)' and spread_of(runs)[1] == median
        sections.setdefault(section, []).append((variant, median, unit, ratio))
    assert list(sections) == ['train', 'eval', 'loader', 'ddp', 'compile: train', 'compile: eval']
    assert [v for v, *_ in sections['train']][0].startswith('original: frozen CLIP on the batch')
    assert len(sections['train']) == 4 and len(sections['eval']) == 3
    assert '--compile (backend eager)' in sections['compile: train'][1][0]
    for section, lines in sections.items():
        timed = [line for line in lines if line[3]]
        base = timed[0][1]
        for variant, median, unit, ratio in timed:
            value, word = ratio.split('x ', 1)
            if section == 'ddp':  # DDP / plain: the overhead
                assert_quotient(value, median, base)
            elif section == 'loader':  # images/s over PIL's
                assert_quotient(value, median, base)
            else:  # a step's speed-up: the baseline's time over this one's
                assert_quotient(value, base, median)
    assert sections['loader'][-1][0].startswith('the training step needs (ours: cached, --amp --channels-last')
    assert "- loader: the pipelines' tensors are bit-identical" in out


def test_gpu_figures_time_box_skips_what_does_not_fit(tmp_path, capsys):
    assert gpu_figures.main(['--out', str(tmp_path / 'f.md'), '--budget', '0.001',
                             '--sections', 'train,loader,ddp']) == 0
    out = capsys.readouterr().out
    rows = markdown_rows(out, 'train') + markdown_rows(out, 'loader') + markdown_rows(out, 'ddp')
    assert [r[0] for r in rows] == ['train', 'loader', 'ddp']
    assert all(r[1] == '(section)' and r[-1].startswith('skipped: time box: 0 s left of --budget 0') for r in rows)


@pytest.mark.parametrize('script, argv, message', [
    (bench_speed, ['--sections', 'train,nope'], "--sections: unknown ['nope']"),
    (bench_loader, ['--passes', '0'], '--passes must be >= 1'),
    (gpu_figures, ['--sections', 'gpu'], "--sections: unknown ['gpu']"),
    (bench_heads, ['--only', 'linear,mlp'], "--only: unknown ['mlp']"),
])
def test_bad_flags_are_one_line(script, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        script.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_openimages_labels_fingerprint_stage(capsys, tmp_path):
    """The fingerprint stage (each stage in its own process) at a tiny size: its line, and its ratios are
    the quotients of the times it printed."""
    from bench import bench_openimages_labels

    assert bench_openimages_labels.main(['--images', '300', '--test-images', '40', '--classes', '20',
                                         '--stages', 'fingerprint', '--workdir', str(tmp_path)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if 'the start-up fingerprint of the labels' in line)
    m = re.search(rf'before ({NUMBER}) s \(4 label arrays hashed as loaded\); now ({NUMBER}) s with an empty cache '
                  rf'dir, ({NUMBER}) s warm .*before/cold ({NUMBER}), before/warm ({NUMBER})', line)
    assert m, line
    before, cold, warm, ratio_cold, ratio_warm = m.groups()
    assert_quotient(ratio_cold, before, cold)
    assert_quotient(ratio_warm, before, warm)
    assert list(tmp_path.iterdir()) == []  # the synthetic data are removed
