"""The demo's components, trained here because nothing can be downloaded: a tiny CLIP, a tiny LM, and MacCap's
projector, text only through `training.train` (what `maccap train` runs) or on image features (the upper bound)."""

import json
from pathlib import Path

import numpy as np

from . import world


# ------------------------------------------------------------------------------------------------ components
def _update(model, optimizer, schedule, loss):
    """One optimizer step of a component's pretraining: backward, gradient norm clipped to 1, schedule step."""
    import torch

    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()


def _contrastive_loss(image_embeds, text_embeds, logit_scale):
    """CLIP's symmetric cross-entropy over a batch of normalised (image, text) pairs."""
    import torch
    import torch.nn.functional as F

    logits = logit_scale * image_embeds @ text_embeds.T
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def clip_folder(settings, scenes, images, folder, log):
    """Train the tiny CLIP contrastively on one random caption per scene and step; save it as a CLIP folder.

    Besides CLIP's loss on its CLS output, a second contrastive term (weight `settings.clip_patch_alignment`) on
    the mean of its projected patch tokens puts those tokens in the joint space too. A CLIP trained at scale has
    that property (the paper's finding 1: subregion features match captions); one trained for two minutes on
    its CLS alone does not, and its subregion features then sit far from every caption."""
    import torch
    import torch.nn.functional as F
    from transformers import CLIPConfig, CLIPModel, get_cosine_schedule_with_warmup

    from ..tools.tiny import tiny_clip_tokenizer, tiny_image_processor

    tokenizer = tiny_clip_tokenizer(world.vocabulary(), context_length=32)
    image_processor = tiny_image_processor("pil", side=settings.image_size)
    tower = dict(hidden_size=settings.clip_width, intermediate_size=2 * settings.clip_width,
                 num_hidden_layers=settings.clip_layers, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=len(tokenizer), max_position_embeddings=32, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1),
        vision_config=dict(tower, image_size=settings.image_size, patch_size=settings.patch_size),
        projection_dim=settings.projection_dim)
    torch.manual_seed(settings.seed)
    model = CLIPModel(config)
    with torch.no_grad():  # with CLIP's init (std 0.02) this tower took 3000 steps to learn where a patch is
        model.vision_model.embeddings.position_embedding.weight.copy_(
            _grid_position_embeddings(settings.image_size // settings.patch_size, settings.clip_width))
    pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.clip_learning_rate, weight_decay=0.1)
    schedule = get_cosine_schedule_with_warmup(optimizer, settings.clip_steps // 20, settings.clip_steps)
    rng = np.random.default_rng([settings.seed, 10])
    for step in range(settings.clip_steps):
        rows = _hard_negative_batch(scenes, settings.batch_size, settings.clip_group_size, rng)
        captions = [scenes[i][1][rng.integers(len(scenes[i][1]))] for i in rows]
        text = tokenizer(captions, padding=True, return_tensors="pt")
        text_embeds = F.normalize(model.get_text_features(**text).pooler_output, dim=-1)
        hidden = model.vision_model(pixel_values=pixel_values[torch.as_tensor(rows)]).last_hidden_state
        tokens = F.normalize(model.visual_projection(model.vision_model.post_layernorm(hidden)), dim=-1)
        scale = model.logit_scale.exp()
        loss = _contrastive_loss(tokens[:, 0], text_embeds, scale)  # what CLIPModel's return_loss computes
        if settings.clip_patch_alignment:
            patches = F.normalize(tokens[:, 1:].mean(1), dim=-1)
            loss = loss + settings.clip_patch_alignment * _contrastive_loss(patches, text_embeds, scale)
        _update(model, optimizer, schedule, loss)
        if (step + 1) % max(settings.clip_steps // 4, 1) == 0:
            log(f"  CLIP step {step + 1}/{settings.clip_steps}: contrastive loss {loss.item():.3f}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return str(folder)


def _grid_position_embeddings(grid, width):
    """2-D sine-cosine position embeddings for a ViT of `grid` x `grid` patches and a CLS token (zeros) in front,
    as MAE initialises its ViTs: half the channels encode the row, half the column, at geometric frequencies."""
    import torch

    quarter = width // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, columns = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                   indexing="ij")
    angles = [axis.flatten()[:, None] * frequencies[None] for axis in (rows, columns)]
    patches = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)
    return torch.cat([torch.zeros(1, width), patches])


def _hard_negative_batch(scenes, batch_size, group_size, rng):
    """Row indices of one CLIP batch: `batch_size // group_size` groups of `group_size` distinct scenes whose salient
    objects have the same colour and shape. A random batch is mostly told apart by its salient objects alone; in
    these groups the loss has to tell where the object is, the background and the other objects."""
    groups = {}
    for i, (scene, _) in enumerate(scenes):
        groups.setdefault((scene.salient.colour, scene.salient.shape), []).append(i)
    remaining = {key: list(groups[key]) for key in sorted(groups)}
    rows = []
    for _ in range(batch_size // group_size):
        keys = [key for key, members in remaining.items() if len(members) >= group_size]
        if not keys:
            raise ValueError(f"too few scenes for {batch_size // group_size} groups of {group_size} in one batch")
        members = remaining[keys[rng.integers(len(keys))]]
        for j in sorted(rng.choice(len(members), group_size, replace=False), reverse=True):
            rows.append(members.pop(j))  # distinct scenes: a key drawn twice gives two groups of other scenes
    return np.asarray(rows)


def lm_folder(settings, scenes, folder, log):
    """Pretrain a tiny decoder LM on the text part's captions and save it as a causal-LM folder.

    A training document is `settings.lm_document_captions` captions of one scene drawn with replacement, each as
    MacCap feeds it ([BOS, caption] ... EOS). Like GPT-2 on web text, the LM learns to continue from its context,
    copying what the context said, which is what lets a prefix steer it. The architecture is Llama's (rotary
    positions): with GPT-2's learned positions a model this small did not learn to copy a word from its context
    in the demo's budget, and with rotary positions it does.

    Which of the salient object's colour, shape and position the LM has learned to copy after `lm_steps` changes
    with the seed and the CPU's rounding. So after them the LM is probed (`lm_copy_rates`) on scenes of the
    "lm_probe" part, which no component trains on; while a rate is below `lm_copy_target`, pretraining goes on
    for another `lm_round_steps` (a warm restart of the schedule at `lm_round_learning_rate`), at most
    `lm_max_rounds` times. Each probe is written to the folder's pretraining_probes.json."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

    from ..tools.tiny import tiny_lm_tokenizer

    tokenizer = tiny_lm_tokenizer(world.vocabulary())
    bos = eos = tokenizer.eos_token_id  # GPT-2's <|endoftext|> is both
    torch.manual_seed(settings.seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=settings.lm_width, intermediate_size=4 * settings.lm_width,
        num_hidden_layers=settings.lm_layers, num_attention_heads=settings.lm_heads,
        num_key_value_heads=settings.lm_heads,
        max_position_embeddings=256, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=True))
    rng = np.random.default_rng([settings.seed, 11])
    token_ids = [tokenizer(list(captions))["input_ids"] for _, captions in scenes]
    probe_scenes = world.sample_part(settings.seed, "lm_probe", settings.lm_probe_scenes, settings.captions_per_scene)

    def pretrain(steps, learning_rate):
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
        schedule = get_cosine_schedule_with_warmup(optimizer, steps // 20, steps)
        for step in range(steps):
            documents = []
            for i in rng.choice(len(scenes), settings.batch_size):
                order = rng.integers(len(token_ids[i]), size=settings.lm_document_captions)
                documents.append([t for c in order for t in [bos] + token_ids[i][c]] + [eos])
            length = max(map(len, documents))
            input_ids = torch.tensor([d + [eos] * (length - len(d)) for d in documents])
            attention_mask = torch.tensor([[1] * len(d) + [0] * (length - len(d)) for d in documents])
            loss = model(input_ids=input_ids, attention_mask=attention_mask,
                         labels=input_ids.masked_fill(attention_mask == 0, -100)).loss
            _update(model, optimizer, schedule, loss)
        return loss.item()

    probes, steps = [], 0
    for round_ in range(settings.lm_max_rounds + 1):
        first = round_ == 0
        round_steps = settings.lm_steps if first else settings.lm_round_steps
        loss = pretrain(round_steps, settings.lm_learning_rate if first else settings.lm_round_learning_rate)
        steps += round_steps
        rates = lm_copy_rates(model, tokenizer, probe_scenes)
        probes.append({"steps": steps, "loss": loss, **rates})
        log(f"  LM step {steps}: loss {loss:.3f}; copies the salient {' / '.join(COPIED_WORDS)} of "
            f"{len(probe_scenes)} probe scenes " + " / ".join(f"{rates[w]:.0%}" for w in COPIED_WORDS))
        if min(rates.values()) >= settings.lm_copy_target:
            break
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (Path(folder) / "pretraining_probes.json").write_text(json.dumps(probes, indent=2) + "\n", encoding="utf-8")
    return str(folder)


COPIED_WORDS = ("colour", "shape", "position", "background")  # what the LM's pretraining probe asks it to copy


def lm_copy_rates(lm, tokenizer, scenes):
    """The LM's in-context use, which is what lets a prefix steer it, as a rate per word of `COPIED_WORDS` over
    (scene, captions) pairs. Colour: given the scene's first caption as context, then BOS and "a large", how often
    the LM's likeliest colour is the salient object's; shape: the same context, then "a large <that colour>", how
    often its likeliest shape is the salient object's. Position: given "a <colour> <shape> in the <position>" of the
    salient object, then BOS and "a <colour> <shape> in the", how often its likeliest of the four positions (by the
    summed log-probability of the position's words) is that position. Background: the same with "... in the
    <position> on <background> ground", then "... in the <position> on" and the four backgrounds."""
    import torch

    bos = lm.config.bos_token_id
    colours = list(world.COLOURS)
    colour_ids = [tokenizer(" " + colour)["input_ids"][0] for colour in colours]
    shape_ids = [tokenizer(" " + shape)["input_ids"][0] for shape in world.SHAPES]

    option_ids = {option: tokenizer(" " + option)["input_ids"] for option in (*world.POSITIONS, *world.BACKGROUNDS)}

    def likeliest(context, options):
        """The option whose words are likeliest after `context` (every option the same number of tokens)."""
        rows = torch.tensor([context + option_ids[option] for option in options])
        logprobs = lm(input_ids=rows).logits.log_softmax(-1)[:, len(context) - 1:-1]
        return options[int(logprobs.gather(-1, rows[:, len(context):, None]).sum((1, 2)).argmax())]

    def ids(text):
        return tokenizer(text)["input_ids"]

    right = dict.fromkeys(COPIED_WORDS, 0)
    with torch.no_grad():
        for scene, captions in scenes:
            s = scene.salient
            context = [bos] + ids(captions[0]) + [bos] + ids("a large") + ids(" " + s.colour)
            logits = lm(input_ids=torch.tensor([context])).logits[0]  # causal: [-2] sees "a large", [-1] the colour
            right["colour"] += colours[int(logits[-2, colour_ids].argmax())] == s.colour
            right["shape"] += world.SHAPES[int(logits[-1, shape_ids].argmax())] == s.shape
            where = f"{s.phrase(False)} in the"
            context = [bos] + ids(f"{where} {s.position}") + [bos] + ids(where)
            right["position"] += likeliest(context, list(world.POSITIONS)) == s.position
            where = f"{s.phrase(False)} in the {s.position} on"
            context = [bos] + ids(f"{where} {scene.background} ground") + [bos] + ids(where)
            right["background"] += likeliest(context, list(world.BACKGROUNDS)) == scene.background
    return {word: count / len(scenes) for word, count in right.items()}


# ---------------------------------------------------------------------------------------------- projectors
def hub_config(settings, folder, captions_file, clip_path, lm_path, train_noise_variance):
    """A hub config for `maccap train` on the demo's components: the paper's method at the demo's sizes, with the
    demo's noise variance at inference (`settings.noise_variance`) and `train_noise_variance` in training."""
    config = {
        "hub": {"repo_id": "maccap/maccap-demo-synthetic-world", "model_name": "MacCap on the demo's synthetic world",
                "license": "apache-2.0"},
        "architecture": {
            "components": {"clip": clip_path, "lm": lm_path},
            # The paper's method (MacCapConfig's defaults) with a projector sized for the tiny CLIP and LM, and noise
            # scaled to its joint space.
            "maccap": {"num_queries": settings.num_queries, "aligner_heads": 4, "aligner_ffn_dim": 4 * settings.lm_width,
                       "train_noise_variance": train_noise_variance,
                       "inference_noise_variance": settings.noise_variance},
        },
        "corpus": {"file": captions_file.name, "column": "caption"},
        "training": {
            "max_caption_length": 25,
            "finetune_lm": False,
            "arguments": {
                "learning_rate": settings.projector_learning_rate, "weight_decay": 0.01,
                "warmup_steps": settings.projector_steps // 20, "lr_scheduler_type": "cosine_warmup_with_min_lr",
                "lr_scheduler_kwargs": {"min_lr_rate": 0.1, "warmup_lr_rate": 0.01}, "max_grad_norm": 1.0,
                "per_device_train_batch_size": settings.batch_size, "max_steps": settings.projector_steps,
                "save_strategy": "no", "logging_steps": max(settings.projector_steps // 2, 1),
                "disable_tqdm": True, "seed": settings.seed, "report_to": "none", "dataloader_pin_memory": False,
            },
        },
    }
    path = Path(folder) / f"hub_config_noise_{train_noise_variance}.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


class ImageCaptionCollator:
    """Rows {"caption", "image": its scene's index} -> the LM inputs of the captions and the pixel values of their
    images, with noise drawn afresh from torch's RNG (noise_seed None), as the text-only runs draw theirs."""

    def __init__(self, processor, pixel_values):
        self.processor, self.pixel_values = processor, pixel_values

    def __call__(self, rows):
        return {**self.processor.caption_lm_inputs([row["caption"] for row in rows]),
                "pixel_values": self.pixel_values[[row["image"] for row in rows]], "noise_seed": None}


def train_on_image_features(hub_config_path, images, captions, output_dir, init_from=None):
    """The upper bound: the projector trained as in `training.train`, conditioned on its own scene's image as
    `generate()` conditions it (subregion features with the inference noise, fresh at every step) instead of on
    the caption's CLIP text embedding with the training noise. Train and test see the same inputs: no modality gap.

    `init_from` (a MacCap folder): start from that model's projector instead of a fresh one, as `maccap train
    --recipe supervised --init-from` does. The demo starts from its text-only projector: trained from scratch on
    the images for the same 1000 steps, it learned less than the text-only one (seed 0, noise variance 0.016: CIDEr
    4.35 against 5.06, the right background in 26% of its captions against 67%; README, the demo's step 3)."""
    import datasets
    from transformers import TrainingArguments, set_seed

    from ..tools.hub_config import load_hub_config
    from ..tools.recipes import starting_model
    from ..tools.training import MacCapTrainer

    config = load_hub_config(hub_config_path)
    args = TrainingArguments(output_dir=str(output_dir), remove_unused_columns=False, label_names=["labels"],
                             **config.training_arguments)
    set_seed(args.seed)
    model = starting_model(init_from, config, config.clip, config.lm, finetune_lm=False)
    processor = model.processor
    processor.max_caption_length = config.max_caption_length
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    per_scene = len(captions) // len(images)
    dataset = datasets.Dataset.from_dict({"caption": captions, "image": np.arange(len(captions)) // per_scene})
    trainer = MacCapTrainer(model=model, args=args, train_dataset=dataset,
                            data_collator=ImageCaptionCollator(processor, pixel_values), processing_class=processor)
    trainer.train()
    trainer.save_model(str(output_dir))
    return output_dir
