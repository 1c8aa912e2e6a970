"""Count the words of a text file and print the most common ones."""

import collections
import sys


def most_common_words(text: str, top: int = 10) -> list[tuple[str, int]]:
    words = [w.strip(".,;:!?\"'()").lower() for w in text.split()]
    return collections.Counter(w for w in words if w).most_common(top)


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        for word, count in most_common_words(f.read()):
            print(f"{count:6d}  {word}")
