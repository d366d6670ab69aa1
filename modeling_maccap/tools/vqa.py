"""Zero-shot VQA evaluation (not remote code): the official VQAv2 answer normalisation and accuracy, VQAv2
question and annotation files, and `maccap vqa`, which answers a question file batch by batch and scores it.

Only the standard library is imported at module level: the CLI imports this module to build its parser.
"""

import json
import re
from collections import defaultdict
from pathlib import Path

from .errors import MacCapError, read_json
from .jobs import DTYPES, JsonlJob, count, load_inference_model, read_records

DEFAULT_IMAGE_PATTERN = "COCO_val2014_{image_id:012d}.jpg"
# What a line of the answers file holds, its key first.
ANSWER_FIELDS = {"question_id": (int, str), "answer": str}

# ------------------------------------------------------------------------------------------ normalisation
# The rules of the official VQA evaluation script (vqaEval.py).
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # apostrophes, colons and periods are not among them
DIGIT_COMMA = re.compile(r"\d,\d")
# The official pattern means "a period not inside a number" but, as written, only looks ahead: a period is
# removed unless a digit follows ("2.5" and ".5" keep theirs, "5." and "st.louis" lose theirs). We do the same.
PERIOD = re.compile(r"\.(?!\d)")
ARTICLES = {"a", "an", "the"}
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
              "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
# The contracted forms the official table restores. It leaves out "i'm", "i've", "i'd've" (its keys are
# capitalised, so they never match lower-cased text), "let's" and "she's" (mapped to themselves) and
# "somebody'd" (mapped the wrong way round, to "somebodyd"), and so do we.
CONTRACTED_FORMS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've
he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've needn't not've
o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's
someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've
there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's
what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def contraction_table(forms=CONTRACTED_FORMS):
    """Each form written with one of its apostrophes left out -> the form: "dont" -> "don't", "couldnt've" and
    "couldn'tve" -> "couldn't've" (the official table's keys; a form missing two apostrophes is not restored)."""
    return {form[:i] + form[i + 1:]: form for form in forms for i, char in enumerate(form) if char == "'"}


CONTRACTIONS = contraction_table()


def normalize_punctuation(text):
    """Punctuation marks become spaces, or vanish when one stands next to a space or the text has a comma between
    digits ("1,000"); then periods not followed by a digit go."""
    digit_comma = DIGIT_COMMA.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # Both tests look at the original text, not at what earlier marks left.
        vanish = digit_comma or mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if vanish else " ")
    return PERIOD.sub("", out)


def normalize_answer(text):
    """The official VQA answer normalisation: punctuation, lower case, number words zero..ten (and "none") to
    digits, articles dropped, contractions restored, single spaces."""
    text = normalize_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [MANUAL_MAP.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


# ---------------------------------------------------------------------------------------------- accuracy
def vqa_accuracy(prediction, answers):
    """VQA accuracy of one predicted answer against the annotators' answers, all normalised.

    The mean, over the n subsets that leave one annotator out, of min(#subset answers equal to the prediction /
    3, 1). For VQAv2's 10 answers that is the official score: 1 matching annotator gives 0.3, 2 give 0.6, 3 give
    0.9, 4 or more give 1. With fewer than 4 answers the 3 becomes n - 1, so that agreeing with every annotator
    still scores 1; with a single answer it is exact match. No answers at all is an error.

    The official script normalises the prediction and the answers only when the annotators disagree; when all
    gave the same answer it compares the stripped strings as they are, so "Yes." scores 0 against ten "yes".
    Here the prediction and every answer are always normalised.
    """
    predicted = normalize_answer(prediction)
    gold = [normalize_answer(answer) for answer in answers]
    if not gold:
        raise MacCapError("no annotator answers to score against")
    if len(gold) == 1:
        return float(gold[0] == predicted)
    full = min(3, len(gold) - 1)
    matches = sum(answer == predicted for answer in gold)
    return sum(min(1.0, (matches - (answer == predicted)) / full) for answer in gold) / len(gold)


def score_answers(answers, annotations):
    """Accuracy in percent, to 2 decimals as the official script reports it, over the questions in `answers`
    ({question_id: predicted answer}; `annotations`: {question_id: annotation}): "overall", "per_answer_type"
    and "per_question_type"."""
    if not answers:
        raise MacCapError("no answered questions to score")
    accuracy = {qid: vqa_accuracy(answer, [a["answer"] for a in annotations[qid]["answers"]])
                for qid, answer in answers.items()}
    groups = {"per_answer_type": defaultdict(list), "per_question_type": defaultdict(list)}
    for qid in accuracy:
        groups["per_answer_type"][annotations[qid].get("answer_type", "unknown")].append(qid)
        groups["per_question_type"][annotations[qid].get("question_type", "unknown")].append(qid)

    def percent(ids):
        return round(100 * sum(accuracy[qid] for qid in ids) / len(ids), 2)

    scores = {"overall": percent(accuracy)}
    scores.update({name: {key: percent(ids) for key, ids in sorted(group.items())} for name, group in groups.items()})
    return scores


# ------------------------------------------------------------------------------------------------- files
def _records(path, key):
    data = read_json(path, f"{key} file")
    records = data.get(key) if isinstance(data, dict) else data  # a bare list is accepted too
    if not isinstance(records, list):
        raise MacCapError(f'{path}: expected {{"{key}": [...]}}')
    return records


def _check_id(value, where, name):
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise MacCapError(f"{where}: {name} must be an integer or a string, got {value!r}")


def read_questions(path):
    """VQAv2 questions, `{"questions": [{"question_id", "image_id", "question"}, ...]}`, in file order."""
    questions, seen = [], set()
    for i, record in enumerate(_records(path, "questions")):
        where = f"{path}: question {i}"
        if not isinstance(record, dict) or not {"question_id", "image_id", "question"} <= record.keys():
            raise MacCapError(f"{where}: needs question_id, image_id and question")
        _check_id(record["question_id"], where, "question_id")
        _check_id(record["image_id"], where, "image_id")
        if not isinstance(record["question"], str) or not record["question"].strip():
            raise MacCapError(f"{where}: the question is empty or not a string")
        if record["question_id"] in seen:
            raise MacCapError(f"{where}: question_id {record['question_id']!r} appears twice")
        seen.add(record["question_id"])
        questions.append({key: record[key] for key in ("question_id", "image_id", "question")})
    return questions


def read_annotations(path):
    """VQAv2 annotations, `{"annotations": [{"question_id", "image_id", "answers": [{"answer"}, ...],
    "answer_type", "question_type"}, ...]}` -> {question_id: annotation}."""
    annotations = {}
    for i, record in enumerate(_records(path, "annotations")):
        where = f"{path}: annotation {i}"
        if not isinstance(record, dict) or "question_id" not in record:
            raise MacCapError(f"{where}: needs a question_id")
        _check_id(record["question_id"], where, "question_id")
        answers = record.get("answers")
        if not isinstance(answers, list) or not answers or not all(
                isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
            raise MacCapError(f'{where}: needs a non-empty "answers" list of {{"answer": "..."}}')
        annotations[record["question_id"]] = record
    return annotations


def read_answers(path):
    """The answers JSONL `maccap vqa` writes -> {question_id: record} (a torn last line is left out)."""
    return {record["question_id"]: record for record in read_records(path, "vqa", ANSWER_FIELDS)}


def image_paths(questions, images_dir, pattern=DEFAULT_IMAGE_PATTERN):
    """{question_id: image file}: `pattern` filled with the question's image_id, inside `images_dir`."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise MacCapError(f"--images {images_dir}: no such folder")
    paths = {}
    for question in questions:
        try:
            paths[question["question_id"]] = images_dir / pattern.format(image_id=question["image_id"])
        except (KeyError, IndexError, ValueError) as error:
            raise MacCapError(f"--image-pattern {pattern!r} cannot name image {question['image_id']!r}: "
                              f"{type(error).__name__}: {error}") from None
    return paths


# --------------------------------------------------------------------------------------------- answering
def _load_images(paths):
    """Each distinct path once: {path: PIL image, or the reason it could not be read}."""
    from ..processing_maccap import load_image

    loaded = {}
    for path in dict.fromkeys(paths):
        try:
            loaded[path] = load_image(path)
        except ValueError as error:
            loaded[path] = str(error)
    return loaded


def answer_questions(model, processor, questions, paths, job, batch_size=16, **generate_kwargs):
    """Answer `questions` batch by batch into `job` (a JsonlJob): each batch's answers, and the questions whose
    image cannot be read, are appended as it goes. Returns [#answered, #failed]."""
    def answer_batch(batch):
        batch_paths = [paths[q["question_id"]] for q in batch]
        images = _load_images(batch_paths)
        ready = [(q, images[path]) for q, path in zip(batch, batch_paths) if not isinstance(images[path], str)]
        answers = []
        if ready:
            pixel_values = processor(images=[image for _, image in ready])["pixel_values"]
            answers = model.answer(pixel_values, [q["question"] for q, _ in ready], processor=processor,
                                   **generate_kwargs)
        return ([{**q, "answer": a} for (q, _), a in zip(ready, answers)],
                [{**q, "image": str(path), "error": images[path]}
                 for q, path in zip(batch, batch_paths) if isinstance(images[path], str)])

    batches = [questions[start:start + batch_size] for start in range(0, len(questions), batch_size)]
    return job.run(batches, answer_batch, len(questions), "question")


# --------------------------------------------------------------------------------------------------- CLI
def add_parser(commands):
    """The `maccap vqa` subcommand."""
    vqa = commands.add_parser(
        "vqa", help="zero-shot VQA: answer (and score) a VQAv2-format question file, or questions about one image",
        description="Answer every question of a VQAv2 questions file (--questions, --images), writing answers as "
                    "JSON lines as it goes; with --annotations, score them with the VQA accuracy. Or answer "
                    "questions about one image (--image, --question).")
    vqa.add_argument("model", help="a MacCap folder or Hub id, with its processor files")
    vqa.add_argument("--questions",
                     help='VQAv2 questions JSON ({"questions": [{"question_id", "image_id", "question"}]})')
    vqa.add_argument("--images", help="folder holding the images")
    vqa.add_argument("--image-pattern", default=DEFAULT_IMAGE_PATTERN,
                     help="image file name from its image_id (default: %(default)s)")
    vqa.add_argument("--annotations", help="VQAv2 annotations JSON: score the answers (overall and per answer type)")
    vqa.add_argument("--out", default="vqa-answers.jsonl", help="answers JSONL (default: %(default)s)")
    vqa.add_argument("--errors", help="JSONL of the questions whose image could not be read, with the reason "
                                      "(default: OUT with .errors.jsonl)")
    vqa.add_argument("--results", help="accuracy JSON, usable as `maccap upload --eval-results` (default: OUT with "
                                       ".results.json)")
    vqa.add_argument("--resume", action="store_true", help="keep the answers already in --out; answer the rest")
    vqa.add_argument("--overwrite", action="store_true", help="start --out over when it already holds answers")
    vqa.add_argument("--limit", type=count(0), help="only the first N questions of the file")
    vqa.add_argument("--batch-size", type=count(1), default=16, help="questions per model call (default: %(default)s)")
    vqa.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    vqa.add_argument("--dtype", choices=DTYPES, default="float32",
                     help="model dtype (default: %(default)s)")
    vqa.add_argument("--num-beams", type=count(1), help="beams (default: 5)")
    vqa.add_argument("--max-new-tokens", type=count(1), help="longest answer in LM tokens (default: 10)")
    vqa.add_argument("--noise-seed", type=int, default=0, help="seed of the per-image noise (default: %(default)s)")
    vqa.add_argument("--dataset-id", default="vqav2", help="dataset id in the results file (default: %(default)s)")
    vqa.add_argument("--dataset-name", default="VQAv2", help="dataset name in the results file (default: %(default)s)")
    vqa.add_argument("--split", default="val2014", help="split in the results file (default: %(default)s)")
    vqa.add_argument("--image", help="answer questions about this one image file (with --question)")
    vqa.add_argument("--question", action="append", help="a question about --image (repeatable)")
    vqa.set_defaults(run=run)
    return vqa


def _check_args(args):
    if args.image or args.question:
        if args.questions or args.images:
            raise MacCapError("give either --image and --question, or --questions and --images, not both")
        if not (args.image and args.question):
            raise MacCapError("--image and --question go together")
        if not all(q.strip() for q in args.question):
            raise MacCapError("--question is empty")
    elif not (args.questions and args.images):
        raise MacCapError("give --questions Q.json and --images DIR (or --image IMG and --question Q)")
    if args.resume and args.overwrite:
        raise MacCapError("--resume and --overwrite exclude each other")


def _generate_kwargs(args):
    options = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    return {"noise_seed": args.noise_seed, **{k: v for k, v in options.items() if v is not None}}


def _answer_one_image(args):
    from ..processing_maccap import load_image

    try:
        image = load_image(args.image)
    except ValueError as error:
        raise MacCapError(str(error)) from None
    model = load_inference_model(args.model, args.device, args.dtype)
    processor = model.processor
    pixel_values = processor(images=[image])["pixel_values"].expand(len(args.question), -1, -1, -1)
    for answer in model.answer(pixel_values, args.question, processor=processor, **_generate_kwargs(args)):
        print(answer)
    return 0


def run(args):
    """`maccap vqa`."""
    _check_args(args)
    if args.image:
        return _answer_one_image(args)
    questions = read_questions(args.questions)[:args.limit]
    paths = image_paths(questions, args.images, args.image_pattern)
    annotations = read_annotations(args.annotations) if args.annotations else None
    missing = [q["question_id"] for q in questions if annotations is not None and q["question_id"] not in annotations]
    if missing:
        raise MacCapError(f"{len(missing)} questions have no annotation in {args.annotations} (first: {missing[0]!r})")
    job = JsonlJob("vqa", args.out, args.errors, ANSWER_FIELDS, "answers")
    done = job.start(args.resume, args.overwrite)
    todo = [q for q in questions if q["question_id"] not in done]
    model = load_inference_model(args.model, args.device, args.dtype)
    answered, failed = answer_questions(model, model.processor, todo, paths, job, args.batch_size,
                                        **_generate_kwargs(args))
    job.finalize([q["question_id"] for q in questions])
    print(f"answered {answered} questions ({len(questions) - len(todo)} answered before) -> {job.out}")
    if failed:
        print(f"{failed} questions left unanswered: their image could not be read -> {job.errors}")
    if annotations is not None:
        _score(args, questions, job.out, annotations)
    return 0


def _score(args, questions, out, annotations):
    """Score the answers file's answers to `questions`; print and write the results file."""
    written = read_answers(out)
    answers = {q["question_id"]: written[q["question_id"]]["answer"] for q in questions if q["question_id"] in written}
    scores = score_answers(answers, annotations)
    metrics = {"VQA accuracy": scores["overall"]}
    metrics.update({f"VQA accuracy ({kind})": value for kind, value in scores["per_answer_type"].items()})
    results = {"dataset": {"id": args.dataset_id, "name": args.dataset_name, "split": args.split},
               "metrics": metrics, "scale": "percent, 2 decimals (as the official VQA script)",
               "questions": len(questions), "answered": len(answers),
               "per_question_type": scores["per_question_type"]}
    results_path = Path(args.results or out.with_suffix(".results.json"))
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"VQA accuracy {scores['overall']:.2f} over {len(answers)} answered of {len(questions)} questions "
          f"-> {results_path}")
    for kind, value in scores["per_answer_type"].items():
        print(f"  {kind}: {value:.2f}")


__all__ = ["add_parser", "answer_questions", "normalize_answer", "read_annotations",
           "read_answers", "read_questions", "score_answers", "vqa_accuracy"]
