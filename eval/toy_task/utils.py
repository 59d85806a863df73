"""lmms-eval hooks of the ``toy_vqa`` task (copied next to its YAML by ``prepare``)."""


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def first_word(text):
    words = text.strip().lower().replace("?", " ").replace(".", " ").split()
    return words[0] if words else ""


def process_results(doc, results):
    hit = {"kind": doc["kind"], "hit": float(first_word(results[0]) == doc["answer"])}
    return {name: hit for name in ("exact_match", "color_exact_match", "shape_exact_match", "presence_exact_match")}


def _mean(results, kind=None):
    hits = [r["hit"] for r in results if kind is None or r["kind"] == kind]
    return sum(hits) / len(hits) if hits else float("nan")


def aggregate_all(results):
    return _mean(results)


def aggregate_color(results):
    return _mean(results, "color")


def aggregate_shape(results):
    return _mean(results, "shape")


def aggregate_presence(results):
    return _mean(results, "presence")
