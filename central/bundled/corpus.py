"""Public-domain text the bundled models are trained on.

Passages from works in the public domain (Dickens 1859 and 1843, Lincoln 1863, the US Declaration of
Independence 1776, Melville 1851, Austen 1813, the King James Bible 1611), kept short so training
stays within a couple of minutes on two CPU cores.
"""

PASSAGES: tuple[str, ...] = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had "
    "everything before us, we had nothing before us, we were all going direct to Heaven, we were all going "
    "direct the other way.",
    "There were a king with a large jaw and a queen with a plain face, on the throne of England; there "
    "were a king with a large jaw and a queen with a fair face, on the throne of France.",
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived "
    "in Liberty, and dedicated to the proposition that all men are created equal.",
    "Now we are engaged in a great civil war, testing whether that nation, or any nation so conceived and "
    "so dedicated, can long endure. We are met on a great battle-field of that war.",
    "The world will little note, nor long remember what we say here, but it can never forget what they "
    "did here.",
    "That government of the people, by the people, for the people, shall not perish from the earth.",
    "When in the Course of human events, it becomes necessary for one people to dissolve the political "
    "bands which have connected them with another, and to assume among the powers of the earth, the "
    "separate and equal station to which the Laws of Nature and of Nature's God entitle them.",
    "We hold these truths to be self-evident, that all men are created equal, that they are endowed by "
    "their Creator with certain unalienable Rights, that among these are Life, Liberty and the pursuit of "
    "Happiness.",
    "Call me Ishmael. Some years ago - never mind how long precisely - having little or no money in my "
    "purse, and nothing particular to interest me on shore, I thought I would sail about a little and see "
    "the watery part of the world.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
    "in want of a wife.",
    "Marley was dead: to begin with. There is no doubt whatever about that. The register of his burial "
    "was signed by the clergyman, the clerk, the undertaker, and the chief mourner.",
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
    "darkness was upon the face of the deep.",
    "The Lord is my shepherd; I shall not want. He maketh me to lie down in green pastures: he leadeth me "
    "beside the still waters.",
)

TEXT = "\n".join(PASSAGES) + "\n"
