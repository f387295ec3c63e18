"""Word lists shared by the synthetic tasks (names and items for word problems, words to spell)."""

NAMES = [
    ("Alice", "she"), ("Bob", "he"), ("Carla", "she"), ("Daniel", "he"), ("Emma", "she"),
    ("Farid", "he"), ("Grace", "she"), ("Hiro", "he"), ("Ines", "she"), ("Jamal", "he"),
    ("Kate", "she"), ("Liam", "he"), ("Maria", "she"), ("Noah", "he"), ("Olga", "she"),
    ("Pedro", "he"), ("Quinn", "she"), ("Ravi", "he"), ("Sara", "she"), ("Tom", "he"),
    ("Uma", "she"), ("Victor", "he"), ("Wen", "she"), ("Yusuf", "he"), ("Zoe", "she"),
]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "cards", "stamps", "shells", "books", "coins"]

WORDS = """
strawberry banana mississippi committee bookkeeper balloon coffee letter apple address
accommodate assessment necessary possession success tomorrow embarrass millennium occurrence
parallel programming raspberry blueberry cherry pepper puppy happiness butterfly grammar summer
hello google yellow pizza giraffe elephant umbrella cinnamon broccoli spaghetti potato tomato
avocado chocolate vanilla caramel marshmallow peppermint watermelon pineapple mango orange
lemon coconut zucchini cucumber carrot lettuce cabbage onion garlic mushroom pumpkin squirrel
rabbit kangaroo hippopotamus alligator crocodile penguin flamingo dolphin octopus jellyfish
mosquito caterpillar grasshopper woodpecker chimpanzee cheetah panther gorilla buffalo
antelope library computer keyboard internet telephone television calendar dictionary
encyclopedia newspaper magazine notebook pencil eraser scissors stapler envelope paragraph
sentence question answer mountain volcano waterfall river ocean island desert forest
valley canyon glacier thunder lightning rainbow tornado hurricane blizzard weather season
autumn winter spring january february september november december saturday wednesday
thursday morning afternoon evening midnight breakfast dinner dessert sandwich hamburger
spoon kitchen bedroom bathroom window ceiling staircase furniture mirror blanket pillow
bottle basket bucket hammer engineer teacher doctor nurse farmer banker lawyer soldier
student professor musician guitar violin trumpet piano drummer orchestra symphony concert
theater cinema museum gallery stadium airport harbor station village kingdom castle
bridge tunnel highway traffic bicycle motorcycle airplane helicopter submarine rocket
satellite planet galaxy universe element molecule electron bubble puzzle riddle mystery
adventure treasure pirate parrot dragon unicorn wizard goblin freedom courage kindness
balance rhythm syllable vowel consonant alphabet language assistant tennessee referee
""".split()
