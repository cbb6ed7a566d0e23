"""Tests of data.py (merged into test_dark.py later): python -m pytest -q test_part_data.py"""
import csv
import io
import json
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data


# --- toy world ---
def test_toy_world_is_deterministic_and_splits_are_disjoint():
    a, b = data.ToyWorld('train', 64, seed=0, length=6), data.ToyWorld('train', 64, seed=0, length=6)
    for i in range(6):
        x, y = a[i], b[i]
        assert np.array_equal(np.asarray(x['image']), np.asarray(y['image']))
        assert repr({**x, 'image': 0}) == repr({**y, 'image': 0})  # repr: nan == nan
    other_seed, val = data.ToyWorld('train', 64, seed=1, length=6), data.ToyWorld('val', 64, seed=0, length=6)
    assert a[0]['caption'] != other_seed[0]['caption'] or a[0]['ga_weeks'] != other_seed[0]['ga_weeks']
    assert not np.array_equal(np.asarray(a[0]['image']), np.asarray(val[0]['image']))
    worlds = [data.ToyWorld(s, length=10 ** 6) for s in data.SPLITS]
    spans = [(w.index(0), w.index(len(w) - 1)) for w in worlds]
    assert all(hi < lo for (_, hi), (lo, _) in zip(spans, spans[1:]))  # index ranges never overlap
    with pytest.raises(IndexError):
        a[6]
    assert a[0]['image'].mode == 'L' and a[0]['image'].size == (64, 64)


def test_head_sizes_follow_the_growth_curve():
    ga = np.linspace(14, 40, 27)
    low, mid, high = data.hc_curve(ga, 'p2.5'), data.hc_curve(ga), data.hc_curve(ga, 'p97.5')
    assert np.all(low < mid) and np.all(mid < high)
    assert 95 < data.hc_curve(14) < 105 and 330 < data.hc_curve(40) < 350  # the curve's known ends, in mm
    for hc, ratio in ((100.0, 0.8), (300.0, 0.95)):  # the skull is drawn on an ellipse whose perimeter is HC
        a, b = data._axes(hc, ratio)
        h = ((a - b) / (a + b)) ** 2
        assert abs(np.pi * (a + b) * (1 + 3 * h / (10 + np.sqrt(4 - 3 * h))) - hc) < 1e-9
    heads = [p for p in (data._sample(np.random.default_rng([0, i])) for i in range(3000)) if p['plane'] == 1]
    ga, hc = np.array([p['days'] / 7 for p in heads]), np.array([p['hc'] for p in heads])
    inside = (data.hc_curve(ga, 'p2.5') <= hc) & (hc <= data.hc_curve(ga, 'p97.5'))
    assert len(heads) > 450 and 0.92 < inside.mean() < 0.98  # 95% between the 2.5th and 97.5th percentiles
    assert abs(np.median(np.log(hc / data.hc_curve(ga)))) < 0.02
    world = data.ToyWorld('val', 64, length=200)
    for item in (world[i] for i in range(200)):
        assert (item['plane'] == 1) == (item['brain_plane'] >= 0) == np.isfinite(item['hc_mm'])
        assert 14 <= item['ga_weeks'] <= 40 and item['pixel_mm'] * 64 in data.FIELDS_MM


def test_captions_state_true_facts_often_enough_to_learn():
    world = data.ToyWorld('train', 64, length=400)
    items = [world[i] for i in range(400)]
    heads = [it for it in items if it['plane'] == 1]
    for it in items:
        text = it['caption']
        m = re.search(r'(\d+) weeks (?:and )?(\d+) days', text)
        if m:
            assert int(m[1]) * 7 + int(m[2]) == round(it['ga_weeks'] * 7)
        m = re.search(r'(\d+\.\d\d) mm', text)
        if m:
            assert m[1] == f"{it['pixel_mm']:.2f}"
        named = [p for p in data.PLANES if p.lower() in text]
        assert named in ([], [data.PLANES[it['plane']]])
    both = [it for it in heads if 'weeks' in it['caption'] and 'mm' in it['caption']]
    sub = [it for it in heads if data.BRAIN_PLANES[it['brain_plane']].lower() in it['caption']]
    named = [it for it in items if data.PLANES[it['plane']].lower() in it['caption']]
    assert len(both) > 0.6 * len(heads) and len(sub) > 0.5 * len(heads) and len(named) > 0.4 * len(items)


def test_toy_tokenizer_covers_the_toy_world():
    tok = data.ToyTokenizer()
    captions = [data._caption(data._sample(np.random.default_rng([7, i])), 2.5, np.random.default_rng([7, i, 1]))
                for i in range(3000)]
    prompts = [p for ps in (*data.TOY_PLANE_PROMPTS.values(), *data.TOY_BRAIN_PROMPTS.values()) for p in ps]
    prompts += [p for w in range(14, 41) for d in range(7) for px in (0.43, 3.0) for p in data.toy_ga_prompts(w, d, px)]
    assert list(data.TOY_PLANE_PROMPTS) == list(data.PLANES) and list(data.TOY_BRAIN_PROMPTS) == list(data.BRAIN_PLANES)
    ids = tok(captions + prompts)
    assert ids.shape == (len(captions) + len(prompts), data.TOY_CONTEXT)
    assert not (ids == tok.unk).any() and ids.max() == tok.eot == data.TOY_VOCAB_SIZE - 1
    assert (ids == tok.eot).sum(1).eq(1).all()  # every text fits: one end token each, none cut off
    assert len(data.TOY_WORDS) == len(set(data.TOY_WORDS)) and len(data.TOY_WORDS) + 3 < data.TOY_VOCAB_SIZE
    long = tok(['fetal brain ' * 40, 'zebra'])
    assert long[0, -1] == tok.eot and long[1].tolist()[:3] == [tok.sot, tok.unk, tok.eot]


def test_save_grid(tmp_path):
    data.save_grid(tmp_path / 'grid.png', n=4, size=32)
    assert Image.open(tmp_path / 'grid.png').size == (64, 64)


# --- CLIP BPE ---
def test_bpe_tokenizer_matches_open_clip(shared):
    cases = json.loads((shared / 'reference/clip_bpe_tokenizer_cases.json').read_text())
    tok = data.get_tokenizer('bpe', cases['context_length'], shared / 'vendor/clip_bpe/bpe_simple_vocab_16e6.txt.gz')
    for case in cases['cases']:
        assert tok([case['text']])[0].tolist() == case['ids'], case['text']
    assert tok.vocab_size == 49408 and (tok.sot, tok.eot) == (49406, 49407)


def test_bpe_tokenizer_without_vocabulary_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv('DARK_BPE', raising=False)
    with pytest.raises(FileNotFoundError, match='bpe_simple_vocab_16e6.txt.gz'):
        data.SimpleTokenizer(tmp_path / 'nothing.txt.gz')


# --- real formats ---
def _png(path, size=(40, 30), value=128):
    Image.new('L', size, value).save(path)


def test_caption_csv_and_tsv(tmp_path):
    (tmp_path / 'img').mkdir()
    _png(tmp_path / 'img/a.png')
    _png(tmp_path / 'img/b.png')
    untidy = ' filepath , title \nimg/a.png, "fetal brain, 20 weeks" \n\nimg/b.png,a femur\n'  # spaces, a blank line
    (tmp_path / 'pairs.csv').write_text(untidy)
    (tmp_path / 'pairs.tsv').write_text('title\tfilepath\nfetal brain\timg/a.png\n')
    rows = data.read_captions(tmp_path / 'pairs.csv')
    assert [r['caption'] for r in rows] == ['fetal brain, 20 weeks', 'a femur']
    assert rows[1]['where'].endswith('pairs.csv, line 4')
    assert data.read_captions(tmp_path / 'pairs.tsv')[0]['image_path'] == tmp_path / 'img/a.png'
    item = data.ImageRows(rows)[0]
    assert item['image'].size == (40, 30) and item['caption'] == 'fetal brain, 20 weeks'
    (tmp_path / 'empty.csv').write_text('filepath,title\nimg/a.png,ok\nimg/b.png,  \n')
    with pytest.raises(ValueError, match=r'empty\.csv, line 3: empty caption'):
        data.read_captions(tmp_path / 'empty.csv')
    (tmp_path / 'nocap.csv').write_text('filepath,text\nimg/a.png,ok\n')
    with pytest.raises(ValueError, match=r"nocap\.csv: missing column\(s\) \['title'\]"):
        data.read_captions(tmp_path / 'nocap.csv')


def test_missing_and_corrupt_images_name_file_and_row(tmp_path):
    (tmp_path / 'bad.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'not really a png' * 10)
    png = io.BytesIO()
    Image.new('L', (64, 64), 9).save(png, 'PNG')
    (tmp_path / 'cut.png').write_bytes(png.getvalue()[:60])  # truncated
    (tmp_path / 'pairs.csv').write_text('filepath,title\nbad.png,one\ncut.png,two\ngone.png,three\n')
    rows = data.ImageRows(data.read_captions(tmp_path / 'pairs.csv'))
    for i, name in enumerate(('bad.png', 'cut.png', 'gone.png')):
        with pytest.raises(ValueError, match=rf'pairs\.csv, line {i + 2}: cannot read image .*{name}'):
            rows[i]


def _write_shard(path, samples):
    with tarfile.open(path, 'w') as tar:
        for name, payload in samples:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _png_bytes(value):
    buffer = io.BytesIO()
    Image.new('L', (16, 12), value).save(buffer, 'PNG')
    return buffer.getvalue()


def test_tar_shards_stream_shard_and_skip(tmp_path):
    assert data.expand_braces('s_{a,b}_{08..10}.tar') == ['s_a_08.tar', 's_a_09.tar', 's_a_10.tar',
                                                          's_b_08.tar', 's_b_09.tar', 's_b_10.tar']
    _write_shard(tmp_path / 'shard_0000000001.tar', [
        ('x/000.png', _png_bytes(0)), ('x/000.txt', b'fetal brain'), ('x/000.json', b'{}'),
        ('x/001.png', _png_bytes(1)), ('x/001.txt', b' fetal femur \n')])
    _write_shard(tmp_path / 'shard_0000000002.tar', [
        ('002.jpg', _png_bytes(2)), ('002.txt', b'maternal cervix'),  # a PNG under .jpg: PIL reads the content
        ('003.png', b'corrupt'), ('003.txt', b'fetal thorax'),
        ('004.png', _png_bytes(4)), ('004.txt', b'fetal abdomen')])
    pattern = str(tmp_path / 'shard_{0000000001..0000000002}.tar')
    with pytest.raises(ValueError, match=r'shard_0000000002\.tar: 003: .*skip_bad'):
        list(data.TarShards(pattern))
    shards = data.TarShards(pattern, skip_bad=True)
    got = [(s['caption'], s['image'].getpixel((0, 0))) for s in shards]
    assert got == [('fetal brain', 0), ('fetal femur', 1), ('maternal cervix', 2), ('fetal abdomen', 4)]
    assert len(shards.skipped) == 1 and '003' in shards.skipped[0][0]
    rank1 = data.TarShards(pattern, skip_bad=True).shard_by(1, 2)
    assert [s['caption'] for s in rank1] == ['maternal cervix', 'fetal abdomen']
    tf = data.Preprocess(32)
    loader = torch.utils.data.DataLoader(data.TarShards(pattern, skip_bad=True), batch_size=2, num_workers=2,
                                         collate_fn=data.Collate(tf, data.ToyTokenizer()))
    batches = list(loader)  # each worker streams its own shard: every sample once
    assert sorted(c for b in batches for c in b['caption']) == sorted(c for c, _ in got)
    assert batches[0]['image'].shape == (2, 3, 32, 32) and batches[0]['ids'].shape == (2, data.TOY_CONTEXT)


def test_fetal_planes_reader_tolerates_whitespace_not_unknown_labels(tmp_path):
    header = 'Image_name ; Patient_num;Plane;Brain_plane;Operator;US_Machine;Train \n'
    good = ('Patient00001_Plane1_1_of_15; 1 ;Fetal brain ; Trans-thalamic;Op. 1;Voluson E6;1\n'
            'Patient00001_Plane2_1_of_15;1;Other;Other;Op. 1;Voluson E6; 0 \n'
            'Patient00002_Plane3_1_of_2;2;Maternal  cervix;Not A Brain;Other;Aloka;1;\n'
            'Patient00002_Plane4_1_of_2;2;Fetal brain;Other;Other;Aloka;1\n')
    (tmp_path / 'FETAL_PLANES_DB_data.csv').write_text(header + good)
    rows = data.read_fetal_planes(tmp_path)
    assert [(r['plane'], r['brain_plane'], r['patient'], r['train']) for r in rows] == [
        (1, 0, '1', True), (-1, -1, '1', False), (4, -1, '2', True), (1, -1, '2', True)]
    assert rows[0]['image_path'] == tmp_path / 'Images/Patient00001_Plane1_1_of_15.png'
    for bad, message in (('Fetal Brain;Trans-thalamic', "line 6: Plane 'Fetal Brain'"),
                         ('Fetal femur;Trans-thalamic', "line 6: Brain_plane 'Trans-thalamic' on a 'Fetal femur'"),
                         ('Fetal brain;Trans-thalamus', "line 6: Brain_plane 'Trans-thalamus'")):
        (tmp_path / 'FETAL_PLANES_DB_data.csv').write_text(header + good + f'P9;9;{bad};Op. 1;Aloka;1\n')
        with pytest.raises(ValueError, match=re.escape(message)):
            data.read_fetal_planes(tmp_path)
    (tmp_path / 'FETAL_PLANES_DB_data.csv').write_text(header.replace('Brain_plane;', '') + 'P;1;Other;Op;M;1\n')
    with pytest.raises(ValueError, match=r"FETAL_PLANES_DB_data\.csv: missing column\(s\) \['Brain_plane'\]"):
        data.read_fetal_planes(tmp_path)


def test_hc18_reader_on_the_real_sample(shared):
    root = shared / 'data/hc18_sample'
    rows = data.read_hc18(root)
    with open(root / 'training_set_pixel_size_and_HC.csv', newline='') as f:
        truth = list(csv.DictReader(f))
    assert len(rows) == len(truth) == 60
    for row, want in zip(rows, truth):
        assert row['image_path'].name == want['filename']
        assert row['pixel_mm'] == float(want['pixel size(mm)'])
        assert row['hc_mm'] == float(want['head circumference (mm)'])
        assert row['width'] == 800 and row['height'] in (540, 542)
    assert 0.05 < min(r['pixel_mm'] for r in rows) < max(r['pixel_mm'] for r in rows) < 0.31
    images = data.ImageRows(rows)
    assert all(images[i]['image'].size == (rows[i]['width'], rows[i]['height']) for i in range(0, 60, 6))


# --- preprocessing ---
def test_preprocess_pads_a_real_image_to_a_centred_square(shared):
    image = Image.open(shared / 'data/hc18_sample/training_set/000_HC.png')
    assert image.size == (800, 540)
    x = data.Preprocess(224)(image)
    # the same thing by another route: numpy zero padding, then PIL's bicubic resize
    padded = np.pad(np.asarray(image), ((130, 130), (0, 0)))
    ref = np.asarray(Image.fromarray(padded).resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255
    mean, std = torch.tensor(data.CLIP_MEAN).view(3, 1, 1), torch.tensor(data.CLIP_STD).view(3, 1, 1)
    assert torch.allclose(x, (torch.from_numpy(ref).expand(3, -1, -1) - mean) / std)
    black = (-mean / std).expand(3, 30, 224)
    assert torch.allclose(x[:, :30], black) and torch.allclose(x[:, -30:], black)  # 130/800*224 = 36 rows each
    assert (x[:, 50:-50] != black[:, :1]).any(2).all()  # the picture fills the middle rows
    rgb = data.Preprocess(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(image.convert('RGB'))
    assert torch.allclose(rgb, 2 * torch.from_numpy(ref).expand(3, -1, -1) - 1, atol=1e-6)


def test_distill_transform_one_draw_two_views():
    image = data.ToyWorld('val', 128, length=1)[0]['image']
    teacher, student = (64, data.CLIP_MEAN, data.CLIP_STD), (32, (0, 0, 0), (1, 1, 1))
    t, s = data.DistillTransform(teacher, student, augment=False)(image)
    assert torch.equal(t, data.Preprocess(*teacher)(image)) and torch.equal(s, data.Preprocess(*student)(image))
    tf = data.DistillTransform(teacher, student)
    torch.manual_seed(0)
    t0, s0 = tf(image)
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip((t0, s0), tf(image)))  # reproducible from torch's seed
    mean, std = torch.tensor(data.CLIP_MEAN).view(3, 1, 1), torch.tensor(data.CLIP_STD).view(3, 1, 1)
    as_student = torch.nn.functional.avg_pool2d(t0 * std + mean, 2)  # the teacher view at the student's size
    gaps = []
    for seed in range(1, 6):
        torch.manual_seed(seed)
        gaps.append((as_student - tf(image)[1]).abs().mean())
    assert (as_student - s0).abs().mean() < 0.5 * min(gaps)  # same draw: same picture; other draws: not


def test_collate_toy_batch_for_distillation():
    world = data.ToyWorld('train', 64, length=4)
    collate = data.Collate(data.DistillTransform((64, data.CLIP_MEAN, data.CLIP_STD), (32, (0,) * 3, (1,) * 3)),
                           data.get_tokenizer('toy', data.TOY_CONTEXT))
    batch = collate([world[i] for i in range(4)])
    t, s = batch['image']
    assert t.shape == (4, 3, 64, 64) and s.shape == (4, 3, 32, 32) and batch['ids'].shape == (4, data.TOY_CONTEXT)
    assert batch['plane'].dtype == torch.long and batch['ga_weeks'].dtype == torch.float32
    assert batch['caption'] == [world[i]['caption'] for i in range(4)]
