"""Benchmark texts: Harvard sentences (IEEE 1969 "Recommended Practice for Speech Quality
Measurements", public domain), phonetically balanced and standard for intelligibility tests."""

from __future__ import annotations

from itertools import cycle, islice

# Lists 1–3 of the Harvard sentences.
HARVARD = [
    # list 1
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    # list 2
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
    # list 3
    "The small pup gnawed a hole in the sock.",
    "The fish twisted and turned on the bent hook.",
    "Press the pants and sew a button on the vest.",
    "The swan dive was far short of perfect.",
    "The beauty of the view stunned the young boy.",
    "Two blue fish swam in the tank.",
    "Her purse was full of useless trash.",
    "The colt reared and threw the tall rider.",
    "It snowed, rained, and hailed the same morning.",
    "Read verse out loud for pleasure.",
]

# The fixed intelligibility set: Harvard list 1.
INTELLIGIBILITY = HARVARD[:10]

ONE_SENTENCE = HARVARD[0]
SHORT_SENTENCE = "Hello there."
# About 4.5 s of speech from piper:joe: the reference audio for cloning.
REFERENCE_TEXT = "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore."


def sentences(count: int) -> str:
    """``count`` sentences (the Harvard lists, cycled) as one text."""
    return " ".join(islice(cycle(HARVARD), count))
