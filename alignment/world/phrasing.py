"""How people talk about the world: caption variants, requests, questions and plain chat.

Every table is split into ``train`` phrasings, which training data may use, and ``held_out``
phrasings, which only the evaluator uses, so that it measures whether a model understands a
request rather than whether it memorised the sentence.

Placeholders: caption templates use the item's fields (see :mod:`.spec`); requests use
``{caption}``; understanding questions hold their modality's placeholder (``<image>`` …);
generation answers use ``{caption}`` and ``{run}`` (the signal token run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .spec import ClipItem, ImageItem, SoundItem

__all__ = ["Phrasings", "CAPTIONS", "REQUESTS", "QUESTIONS", "ANSWERS", "PLAIN_QUESTIONS", "PLAIN_REPLIES",
           "all_phrasings"]

Split = Literal["train", "held_out"]


@dataclass(frozen=True)
class Phrasings:
    """Phrasings of one kind, split into those training may use and those kept for evaluation."""

    train: tuple[str, ...]
    held_out: tuple[str, ...]

    def __post_init__(self) -> None:
        shared = set(self.train) & set(self.held_out)
        if shared:
            raise ValueError(f"phrasings both in train and held out: {sorted(shared)}")

    def split(self, name: Split) -> tuple[str, ...]:
        """The ``"train"`` or ``"held_out"`` phrasings."""
        if name not in ("train", "held_out"):
            raise ValueError(f"split must be 'train' or 'held_out', got {name!r}")
        return self.train if name == "train" else self.held_out


#: Caption templates per modality; ``train[0]`` is the canonical caption of :mod:`.spec`.
CAPTIONS: dict[str, Phrasings] = {
    "image": Phrasings(
        train=(ImageItem.TEMPLATE, "a {colour} {shape} against a {background} background",
               "a {shape} in {colour} on a {background} background"),
        held_out=("a {colour} {shape} over a {background} backdrop",
                  "a {background} picture with a {colour} {shape} in it")),
    "audio": Phrasings(
        train=(SoundItem.TEMPLATE, "a {waveform} wave at a {pitch} pitch"),
        held_out=("a {pitch}-pitched {waveform} sound", "a {waveform} note with a {pitch} pitch")),
    "video": Phrasings(
        train=(ClipItem.TEMPLATE, "a {colour} {shape} that moves {direction}"),
        held_out=("a {colour} {shape} sliding {direction}", "a {colour} {shape} travelling {direction}")),
}

#: Requests for new media. The train phrasings are the synthetic dataset's, in its order.
REQUESTS: dict[str, Phrasings] = {
    "image": Phrasings(
        train=("show me {caption}", "draw {caption}", "can you paint {caption}?"),
        held_out=("show me a picture of {caption}", "generate an image of {caption}",
                  "I'd like to see {caption}, please")),
    "audio": Phrasings(
        train=("play {caption}", "let me hear {caption}", "make a sound: {caption}"),
        held_out=("I want to hear {caption}", "can you synthesize {caption}?",
                  "give me the sound of {caption}")),
    "video": Phrasings(
        train=("make a video of {caption}", "show me a clip of {caption}", "animate {caption}"),
        held_out=("generate a video showing {caption}", "create an animation of {caption}",
                  "film {caption} for me")),
}

#: Questions about an attached item, answered with its caption. Train: the synthetic dataset's.
QUESTIONS: dict[str, Phrasings] = {
    "image": Phrasings(
        train=("<image> What is in this picture?", "Describe this image. <image>"),
        held_out=("<image> What do you see?", "Tell me what this picture shows. <image>")),
    "audio": Phrasings(
        train=("<audio> What do you hear?", "Describe this sound. <audio>"),
        held_out=("<audio> What sound is this?", "Listen to this: <audio> What is it?")),
    "video": Phrasings(
        train=("<video> What happens in this video?", "Describe this clip. <video>"),
        held_out=("<video> What is going on in this clip?", "Tell me what this video shows. <video>")),
}

#: The assistant's answers to a request (training data only, so there is no held-out set).
ANSWERS = ("Here is {caption}. {run}", "Sure! {run}", "This is {caption}: {run}")

#: Chat prompts that ask for no media: a model must answer them with text alone.
PLAIN_QUESTIONS = Phrasings(
    train=("Hello!", "How are you today?", "What is two plus two?", "Tell me a joke.",
           "What is the capital of France?", "Thank you!"),
    held_out=("Good morning!", "What is three plus four?", "What colour is the sky?",
              "Can you say something nice?"))

#: A text reply for each train plain question, for training data.
PLAIN_REPLIES: dict[str, str] = {
    "Hello!": "Hello! How can I help you?",
    "How are you today?": "I am fine, thank you.",
    "What is two plus two?": "Two plus two is four.",
    "Tell me a joke.": "Why did the circle go to school? To get well rounded.",
    "What is the capital of France?": "The capital of France is Paris.",
    "Thank you!": "You are welcome!",
}


def all_phrasings(split: Split) -> set[str]:
    """Every caption template, request, question and plain question of ``split``."""
    tables = [*CAPTIONS.values(), *REQUESTS.values(), *QUESTIONS.values(), PLAIN_QUESTIONS]
    return {phrase for table in tables for phrase in table.split(split)}
