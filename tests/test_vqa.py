"""Zero-shot VQA: the VQAv2 answer normalisation and accuracy, `model.answer`, and `maccap vqa` end to end.
Expected values are worked out by hand in the tests."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from modeling_maccap.tools.cli import main
from modeling_maccap.tools.hub import read_eval_results
from modeling_maccap.tools.errors import MacCapError
from modeling_maccap.tools.vqa import normalize_answer, score_answers, vqa_accuracy

from .conftest import random_image

BOS = 0  # the tiny GPT-2 tokenizer's <|endoftext|>: BOS, EOS and padding


# ------------------------------------------------------------------------------------------ normalisation
@pytest.mark.parametrize("raw,expected", [
    # punctuation next to a space vanishes; between two words it becomes a space
    ("yes , it is", "yes it is"),
    ("red/blue", "red blue"),
    ("t-shirt", "t shirt"),
    ("yes!", "yes"),
    ("(left)", "left"),
    # a comma between digits vanishes, and then every other mark vanishes too
    ("1,000", "1000"),
    ("2,500-3,000", "25003000"),
    ("red,blue", "red blue"),
    # a period goes unless a digit follows
    ("yes.", "yes"),
    ("2.5", "2.5"),
    ("3.5.", "3.5"),
    ("st.louis", "stlouis"),
    # apostrophes and colons stay
    ("10:30", "10:30"),
    ("don't", "don't"),
    # articles, as whole words only
    ("a dog", "dog"),
    ("an apple", "apple"),
    ("The cat on the mat", "cat on mat"),
    ("theater", "theater"),
    ("another", "another"),
    # number words zero..ten
    ("two", "2"),
    ("Zero", "0"),
    ("ten dogs", "10 dogs"),
    ("eleven", "eleven"),
    # the manual map's other entry
    ("none", "0"),
    # contractions written without their apostrophe
    ("dont", "don't"),
    ("isnt it", "isn't it"),
    ("couldnt've", "couldn't've"),
    ("couldn'tve", "couldn't've"),
    ("oclock", "o'clock"),
    ("twas", "'twas"),
    ("yall'd've", "y'all'd've"),
    # whitespace and case
    ("  Yes\tPlease\n", "yes please"),
    ("YES", "yes"),
    ("two   dogs", "2 dogs"),
    ("The Two Dogs.", "2 dogs"),
])
def test_answer_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


# ----------------------------------------------------------------------------------------------- accuracy
def annotators(matching, answer="2", total=10):
    return [answer] * matching + [f"other{i}" for i in range(total - matching)]


@pytest.mark.parametrize("matching,expected", [
    # m of 10 annotators match. The m matching annotators' subsets hold m - 1 matches, the 10 - m others' hold m:
    (0, 0.0),   # 0
    (1, 0.3),   # (1 * 0/3 + 9 * 1/3) / 10 = 3/10
    (2, 0.6),   # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6/10
    (3, 0.9),   # (3 * 2/3 + 7 * 1) / 10 = (2 + 7) / 10
    (4, 1.0),   # (4 * 1 + 6 * 1) / 10
    (10, 1.0),
])
def test_accuracy_averages_the_ten_leave_one_out_subsets(matching, expected):
    assert vqa_accuracy("2", annotators(matching)) == pytest.approx(expected)


def test_answers_match_only_after_normalisation():
    # "Two." and "2" and "the two" are one answer after normalisation: 3 matches -> 0.9.
    assert vqa_accuracy("Two.", ["2", "two", "the two"] + [f"other{i}" for i in range(7)]) == pytest.approx(0.9)
    assert vqa_accuracy("a dont", ["don't"] * 4 + ["do"] * 6) == 1.0
    # Three annotators agree with each other, but not with "twos": 0.
    assert vqa_accuracy("twos", ["2", "two", "the two"] + [f"other{i}" for i in range(7)]) == 0.0


@pytest.mark.parametrize("answers,expected", [
    # 3 answers: full credit at min(3, 3 - 1) = 2 matches in a subset of 2.
    (["2", "x", "y"], 1 / 3),  # (0/2 + 1/2 + 1/2) / 3
    (["2", "2", "y"], 2 / 3),  # (1/2 + 1/2 + 2/2) / 3
    (["2", "2", "2"], 1.0),
    # 2 answers: full credit at 1 match in a subset of 1.
    (["2", "x"], 0.5),         # (0 + 1) / 2
    # one answer: exact match
    (["two"], 1.0),
    (["x"], 0.0),
])
def test_fewer_than_ten_answers(answers, expected):
    assert vqa_accuracy("2", answers) == pytest.approx(expected)


def test_no_answers_is_an_error():
    with pytest.raises(MacCapError, match="no annotator answers"):
        vqa_accuracy("2", [])


def test_scores_are_percent_overall_and_per_answer_type():
    def annotation(answers, answer_type, question_type):
        return {"answers": [{"answer": a} for a in answers], "answer_type": answer_type,
                "question_type": question_type}

    annotations = {1: annotation(annotators(1, "yes"), "yes/no", "is"),   # 0.3
                   2: annotation(annotators(3, "yes"), "yes/no", "is"),   # 0.9
                   3: annotation(annotators(2, "3"), "number", "how many")}  # 0.6
    scores = score_answers({1: "Yes", 2: "yes", 3: "three"}, annotations)
    assert scores["overall"] == pytest.approx(60.0)  # (0.3 + 0.9 + 0.6) / 3
    assert scores["per_answer_type"] == pytest.approx({"yes/no": 60.0, "number": 60.0})
    assert scores["per_question_type"] == pytest.approx({"is": 60.0, "how many": 60.0})


# ----------------------------------------------------------------------------------------- model.answer
def spy_on_lm_generate(model, monkeypatch, fake_output=None):
    """Record every call to the LM's generate (and its output); with `fake_output`, return that instead."""
    calls = []
    real = model.language_model.generate

    def spy(*args, **kwargs):
        out = real(*args, **kwargs) if fake_output is None else fake_output
        calls.append({**kwargs, "output": out})
        return out

    monkeypatch.setattr(model.language_model, "generate", spy)
    return calls


def prompt_ids(tokenizer, question):
    return [BOS] + tokenizer(f"Question: {question} Short answer:", add_special_tokens=False)["input_ids"]


def first_line(text):
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


QUESTIONS = ["what is it?", "is the dog on the red table with a man?", "how many cats?"]


def test_a_batch_gives_the_same_answers_as_one_by_one(model, processor, images):
    pixel_values = processor(images=images)["pixel_values"]
    batched = model.answer(pixel_values, QUESTIONS)
    assert batched == [model.answer(pixel_values[i:i + 1], [QUESTIONS[i]])[0] for i in range(3)]


def test_the_lm_sees_the_prefix_then_bos_and_the_question_prompt(model, processor, images, monkeypatch):
    calls = spy_on_lm_generate(model, monkeypatch)
    questions = ["is the dog red?", "what is on the table with the man?"]
    model.answer(processor(images=images[:2])["pixel_values"], questions)
    (call,) = calls
    rows = [prompt_ids(processor.tokenizer, q) for q in questions]
    width, queries = max(map(len, rows)), model.config.num_queries
    embeds, mask = call["inputs_embeds"], call["attention_mask"]
    assert embeds.shape[:2] == (2, queries + width)
    embed = model.get_input_embeddings()
    for b, row in enumerate(rows):  # left-padded: [prefix | padding | BOS, prompt]
        torch.testing.assert_close(embeds[b, queries + width - len(row):], embed(torch.tensor(row)))
        assert mask[b].tolist() == [1] * queries + [0] * (width - len(row)) + [1] * len(row)


def test_decoding_is_beam_search_with_5_beams_and_at_least_one_new_token(model, processor, images, monkeypatch):
    calls = spy_on_lm_generate(model, monkeypatch)
    pixel_values = processor(images=images)["pixel_values"]
    model.answer(pixel_values, QUESTIONS)
    config = calls[0]["generation_config"]
    assert (config.num_beams, config.min_new_tokens, config.max_new_tokens) == (5, 1, 10)
    assert config.length_penalty == -1.0 and not config.do_sample
    assert calls[0]["output"].shape[0] == 3  # one answer per question: no reranked candidates
    model.answer(pixel_values, QUESTIONS, num_beams=2, max_new_tokens=3)
    config = calls[1]["generation_config"]
    assert (config.num_beams, config.min_new_tokens, config.max_new_tokens) == (2, 1, 3)
    assert 1 <= calls[1]["output"].shape[1] <= 3


@pytest.mark.parametrize("noise_seed", [0, 1])
def test_answer_is_generate_on_the_hand_built_prompt(model, processor, images, noise_seed):
    pixel_values = processor(images=images)["pixel_values"]
    rows = [prompt_ids(processor.tokenizer, q) for q in QUESTIONS]
    width = max(map(len, rows))
    input_ids = torch.tensor([[BOS] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    sequences = model.generate(pixel_values, input_ids, attention_mask, rerank=False, noise_seed=noise_seed,
                               num_beams=5, min_new_tokens=1, max_new_tokens=10, length_penalty=-1.0)
    expected = [first_line(processor.tokenizer.decode(s[width:], skip_special_tokens=True)) for s in sequences]
    assert model.answer(pixel_values, QUESTIONS, noise_seed=noise_seed) == expected


def test_the_prefix_noise_is_generate_s_for_the_same_noise_seed(model, processor, images, monkeypatch):
    calls = spy_on_lm_generate(model, monkeypatch)
    inputs = processor(images=images[:1], text=model.format_vqa_prompts(["what is it?"]))
    queries = model.config.num_queries
    for seed in (0, 1):
        model.generate(**inputs, rerank=False, noise_seed=seed, max_new_tokens=1)
        model.answer(inputs["pixel_values"], ["what is it?"], noise_seed=seed, max_new_tokens=1)
    prefixes = [call["inputs_embeds"][:, :queries] for call in calls]
    torch.testing.assert_close(prefixes[1], prefixes[0])  # seed 0: answer's prefix == generate's
    torch.testing.assert_close(prefixes[3], prefixes[2])  # seed 1
    assert not torch.equal(prefixes[0], prefixes[2])


def test_the_answer_is_the_first_line_of_the_text_after_the_prompt(model, processor, images, monkeypatch):
    tok = processor.tokenizer
    texts = [" yes\nQuestion: is it red? Short answer: no", "\n  two dogs  \n"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    new_tokens = torch.tensor([row + [BOS] * (width - len(row)) for row in rows])  # EOS-padded, as beam search ends
    spy_on_lm_generate(model, monkeypatch, fake_output=new_tokens)
    answers = model.answer(processor(images=images[:2])["pixel_values"], ["is it red?", "how many?"])
    assert answers == ["yes", "two dogs"]


def test_one_question_for_every_image(model, processor, images):
    pixel_values = processor(images=images)["pixel_values"]
    assert model.answer(pixel_values, "what is it?") == model.answer(pixel_values, ["what is it?"] * 3)


@pytest.mark.parametrize("questions,kwargs,message", [
    (["a?", "b?"], {}, "got 3 images but 2 questions"),
    (["a?", "", "c?"], {}, "question 1 is empty"),
    (["a?", "b?", "  "], {}, "question 2 is empty"),
    (["a?", 5, "c?"], {}, "question 1 must be a string"),
    (None, {}, "questions must be a string or a list"),
    (["a?"] * 3, {"rerank": True}, "does not take"),
    (["a?"] * 3, {"num_return_sequences": 2}, "does not take"),
])
def test_bad_questions_and_options_are_clear_errors(model, processor, images, questions, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.answer(processor(images=images)["pixel_values"], questions, **kwargs)


def test_answer_needs_the_tokenizer(model, processor, images):
    pixel_values = processor(images=images[:1])["pixel_values"]
    expected = model.answer(pixel_values, ["what is it?"])
    model.processor = None
    with pytest.raises(ValueError, match="needs the LM tokenizer"):
        model.answer(pixel_values, ["what is it?"])
    assert model.answer(pixel_values, ["what is it?"], processor=processor) == expected


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_maccap"] = None  # the installed package must not be used
    from transformers import AutoModel, AutoProcessor

    folder, image, questions = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    pixel_values = processor(images=[image] * len(questions))["pixel_values"]
    print(json.dumps({"module": type(model).__module__, "answers": model.answer(pixel_values, questions)}))
    """
)


def test_remote_code_users_get_answer_too(model, processor, checkpoint, tmp_path):
    path = tmp_path / "image.png"
    random_image(5).save(path)
    expected = model.answer(processor(images=[str(path)] * 3)["pixel_values"], QUESTIONS)
    run = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(checkpoint), str(path), json.dumps(QUESTIONS)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path,
                         timeout=600, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["module"].startswith("transformers_modules.")
    assert got["answers"] == expected


# -------------------------------------------------------------------------------------------- maccap vqa
def image_name(image_id):
    return f"COCO_val2014_{image_id:012d}.jpg"


@pytest.fixture
def vqa_files(tmp_path):
    """Images 1-3 (random), image 4 (corrupt), and five questions: two on image 1, one on the corrupt image."""
    images = tmp_path / "images"
    images.mkdir()
    for image_id in (1, 2, 3):
        random_image(10 + image_id, (40 + 8 * image_id, 36)).save(images / image_name(image_id))
    (images / image_name(4)).write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    questions = [(11, 1, "is the dog red?"), (12, 1, "what is on the table?"), (13, 2, "how many cats?"),
                 (14, 3, "what colour is the grass?"), (15, 4, "is it a photo?")]
    path = tmp_path / "questions.json"
    path.write_text(json.dumps({"questions": [{"question_id": q, "image_id": i, "question": text}
                                              for q, i, text in questions]}))
    return path, images


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def annotation(question_id, answers, answer_type):
    return {"question_id": question_id, "image_id": 0, "answers": [{"answer": a} for a in answers],
            "answer_type": answer_type, "question_type": "what"}


def fillers(count):
    return [f"zzfiller{i}" for i in range(count)]


def test_maccap_vqa_answers_records_bad_images_resumes_and_scores(model, processor, checkpoint, vqa_files, tmp_path,
                                                                  capsys):
    questions, images = vqa_files
    out = tmp_path / "run" / "answers.jsonl"
    args = ["vqa", str(checkpoint), "--questions", str(questions), "--images", str(images), "--out", str(out),
            "--batch-size", "2", "--device", "cpu"]
    assert main(args) == 0

    answers = read_jsonl(out)
    assert [a["question_id"] for a in answers] == [11, 12, 13, 14]
    assert all(set(a) == {"question_id", "image_id", "question", "answer"} for a in answers)
    assert [(a["image_id"], a["question"]) for a in answers] == [
        (1, "is the dog red?"), (1, "what is on the table?"), (2, "how many cats?"), (3, "what colour is the grass?")]
    paths = [str(images / image_name(a["image_id"])) for a in answers]
    expected = model.answer(processor(images=paths)["pixel_values"], [a["question"] for a in answers])
    assert [a["answer"] for a in answers] == expected
    (error,) = read_jsonl(tmp_path / "run" / "answers.errors.jsonl")
    assert (error["question_id"], error["image"]) == (15, str(images / image_name(4)))
    assert image_name(4) in error["error"] and ("not an image" in error["error"] or "corrupt" in error["error"])

    # An existing answers file is neither overwritten nor appended to without being told.
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("maccap vqa: error:") and "already holds answers" in err and "--resume" in err

    # Annotations built on the answers, with the number of matching annotators chosen per question.
    given = {a["question_id"]: a["answer"] for a in answers}
    annotations = [
        annotation(11, [given[11].upper() + "."] + fillers(9), "yes/no"),  # 1 match, after normalisation: 0.3
        annotation(12, [given[12]] * 3 + fillers(7), "yes/no"),  # 3 matches: 0.9
        annotation(13, fillers(10), "number"),  # 0 matches: 0
        annotation(14, [given[14]] * 10, "other"),  # 10 matches: 1
        annotation(15, ["yes"] * 10, "yes/no"),  # its image is unreadable: not answered, not scored
    ]
    annotations_path = tmp_path / "annotations.json"
    annotations_path.write_text(json.dumps({"annotations": annotations}))

    # A run killed while writing leaves half a line: --resume drops it and answers that question again.
    out.write_bytes(out.read_bytes()[:-7])
    assert main(args + ["--resume", "--annotations", str(annotations_path)]) == 0
    assert read_jsonl(out) == answers
    assert [e["question_id"] for e in read_jsonl(tmp_path / "run" / "answers.errors.jsonl")] == [15]

    (results,) = read_eval_results(tmp_path / "run" / "answers.results.json")
    assert results["dataset"] == {"id": "vqav2", "name": "VQAv2", "split": "val2014"}
    assert results["metrics"] == pytest.approx({
        "VQA accuracy": 55.0,  # 100 * (0.3 + 0.9 + 0 + 1) / 4
        "VQA accuracy (yes/no)": 60.0,  # 100 * (0.3 + 0.9) / 2
        "VQA accuracy (number)": 0.0,
        "VQA accuracy (other)": 100.0,
    })
    assert (results["questions"], results["answered"]) == (5, 4) and results["scale"].startswith("percent")
    assert "VQA accuracy 55.00 over 4 answered of 5 questions" in capsys.readouterr().out


def test_maccap_vqa_answers_questions_about_one_image(model, processor, checkpoint, tmp_path, capsys):
    path = tmp_path / "photo.png"
    random_image(7).save(path)
    assert main(["vqa", str(checkpoint), "--image", str(path), "--question", "what is this?",
                 "--question", "is it red?", "--max-new-tokens", "4"]) == 0
    expected = model.answer(processor(images=[str(path)] * 2)["pixel_values"], ["what is this?", "is it red?"],
                            max_new_tokens=4)
    assert capsys.readouterr().out.split("\n")[:2] == expected


@pytest.mark.parametrize("content,extra,message", [
    (None, [], "no such file"),
    ({"questions": [{"question_id": 1, "question": "what?"}]}, [], "needs question_id, image_id and question"),
    ({"questions": [{"question_id": 1, "image_id": 1, "question": " "}]}, [], "empty"),
    ({"questions": [{"question_id": 1, "image_id": 1, "question": "a?"}] * 2}, [], "appears twice"),
    ({"questions": [{"question_id": 1, "image_id": "x", "question": "a?"}]}, [], "cannot name image"),
    ({"questions": [{"question_id": 1, "image_id": 1, "question": "a?"}]}, ["--annotations", "{annotations}"],
     "1 questions have no annotation"),
    ({"questions": [{"question_id": 1, "image_id": 1, "question": "a?"}]}, ["--image", "x.png"], "not both"),
    ({"questions": [{"question_id": 1, "image_id": 1, "question": "a?"}]}, [], "cannot load the MacCap model"),
])
def test_maccap_vqa_input_errors_are_reported(tmp_path, capsys, content, extra, message):
    questions = tmp_path / "questions.json"
    if content is not None:
        questions.write_text(json.dumps(content))
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps({"annotations": [annotation(2, ["yes"], "yes/no")]}))
    extra = [arg.format(annotations=annotations) for arg in extra]
    args = ["vqa", str(tmp_path / "no-model"), "--questions", str(questions), "--images", str(tmp_path),
            "--out", str(tmp_path / "answers.jsonl"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("maccap vqa: error:") and message in err


def test_counts_below_their_minimum_are_refused_by_the_parser(tmp_path, capsys):
    for option, value in (("--batch-size", "0"), ("--limit", "-1"), ("--num-beams", "0")):
        with pytest.raises(SystemExit) as stop:
            main(["vqa", str(tmp_path), "--questions", "q.json", "--images", str(tmp_path), option, value])
        assert stop.value.code == 2
        assert f"argument {option}: invalid" in capsys.readouterr().err


def test_maccap_vqa_needs_an_input(tmp_path, capsys):
    assert main(["vqa", str(tmp_path)]) == 2
    assert "give --questions" in capsys.readouterr().err
    assert main(["vqa", str(tmp_path), "--image", "x.png"]) == 2
    assert "go together" in capsys.readouterr().err
