"""Real English sentences shared by tests and benchmarks (calibration sets and held-out evaluation sets).

One place for them, so a benchmark and the test that guards its claim read the same text. Each list is
what a measured figure was taken on: change a list and the figures in benchmarks/results that cite it
must be re-measured.
"""

from __future__ import annotations

# Sentence-embedding calibration (cpu-int8 budget on MiniLM; benchmarks/bench_precision.py, tests/test_precision_minilm.py).
CALIBRATION = [
    'The bakery on the corner sells fresh croissants every morning.',
    'Our flight was cancelled because of the storm.',
    'She repaired the old bicycle with parts from a flea market.',
    'Rivers carry sediment from the mountains to the sea.',
    'The orchestra rehearsed the symphony for three weeks.',
    'He keeps his passwords in an encrypted notebook.',
    'A fox crossed the road just before dawn.',
    'The city council approved a new budget for public parks.',
    'Vaccines train the immune system to recognise a pathogen.',
    'My grandmother grows lavender and rosemary on her balcony.',
    'The software update fixed a bug in the login screen.',
    'Tourists queued for hours to see the famous painting.',
    'Wind turbines generate electricity even on cloudy days.',
    'The detective found a clue hidden under the carpet.',
    'Students presented their science projects in the gym.',
    'The soup needs a little more salt and pepper.',
]

# Held out from CALIBRATION: sentence-embedding accuracy (bench_precision uses all 32, the test the first 24).
HELD_OUT = [
    'A small boat drifted slowly across the calm lake.',
    'The company reported higher profits in the third quarter.',
    'He learned to play chess from his older brother.',
    'The hospital opened a new wing for children.',
    'Heavy snow closed the mountain pass for a week.',
    'She translated the novel from Spanish into English.',
    'The neural network was trained on millions of images.',
    'Farmers are worried about the long dry summer.',
    'The kitten fell asleep on a pile of warm laundry.',
    'Archaeologists uncovered a Roman villa near the river.',
    'Please turn off the lights when you leave the room.',
    'The marathon runners passed the finish line in the rain.',
    'Electric cars are becoming cheaper every year.',
    'The teacher explained fractions with slices of pizza.',
    'A loud thunderclap woke everyone in the house.',
    "The museum's dinosaur skeleton is over ten metres long.",
    'Coffee prices rose after a poor harvest in Brazil.',
    'They painted the fence white before the party.',
    "The spacecraft sent back photographs of Saturn's rings.",
    'I could not find my keys anywhere this morning.',
    'The judge postponed the trial until next month.',
    'Bread dough must rest before it goes into the oven.',
    'The volunteers cleaned plastic from the beach.',
    'His speech about climate policy received long applause.',
    'Many birds migrate south before the winter arrives.',
    'The printer jammed halfway through the report.',
    'A gentle breeze carried the smell of the sea.',
    'The startup hired twenty engineers last month.',
    'Mathematics is the language of the physical sciences.',
    'The children built a snowman in the front garden.',
    'Our neighbours are renovating their kitchen.',
    'The bridge was closed for repairs over the weekend.',
]

# Everyday sentences: pruning accuracy (bench_compression), MiniLM end-to-end checks (first 4).
EVERYDAY = [
    'The cat sat quietly on the warm windowsill.',
    'Compilers rewrite programs into faster equivalent programs.',
    'A heavy rain fell over the harbour all night.',
    'She ordered a coffee and opened her laptop.',
    'The train to Edinburgh was delayed by forty minutes.',
    'Photosynthesis converts sunlight into chemical energy.',
    'He forgot his umbrella and got soaked on the way home.',
    'The museum opens at nine on weekdays.',
    'Our team finally fixed the memory leak in the parser.',
    'Fresh bread smells wonderful in the early morning.',
    'The committee postponed the vote until next spring.',
    'Mountains in the north are covered with snow all year.',
    'Please remember to water the tomatoes while I am away.',
    'The stock market fell sharply after the announcement.',
    'Children were playing football in the park after school.',
    "A good night's sleep improves concentration.",
    'The recipe calls for two cups of flour and one egg.',
    'Astronomers discovered a planet orbiting a distant star.',
    'The library is quiet except for the ticking clock.',
    'He plays the violin in a small orchestra.',
    'Traffic on the bridge was worse than usual this morning.',
    'The new phone has a larger screen and a better camera.',
    'Bees are essential for pollinating many crops.',
    'She wrote her thesis on medieval trade routes.',
    'The hotel room had a view of the old harbour.',
    'Regular exercise lowers the risk of heart disease.',
    'The printer on the second floor is out of paper again.',
    'They hiked along the coast for three days.',
    'Interest rates are expected to rise next quarter.',
    'The dog barked at the delivery van.',
    'Learning a new language takes patience and practice.',
    'The bridge was built more than a century ago.',
    'A sudden power cut stopped every machine in the factory.',
    'The garden is full of roses in June.',
    'The software update fixed several security problems.',
    'We watched the sunset from the top of the hill.',
]

# Calibration for pruning's activation scores (bench_compression).
EVERYDAY_CALIBRATION = [
    'The weather forecast promises sunshine for the weekend.',
    'Engineers tested the new engine on a cold morning.',
    'My neighbour grows pumpkins in his back garden.',
    'The orchestra rehearsed the symphony twice before the concert.',
    'Students queued outside the exam hall in silence.',
    'The river flooded the lower streets after the storm.',
    'A database index makes lookups much faster.',
    'The chef sharpened his knives before service.',
]

# Calibration for decoders' int4/GPTQ (tests/test_int4.py).
DECODER_CALIBRATION = [
    EVERYDAY_CALIBRATION[0],
    EVERYDAY_CALIBRATION[1],
    EVERYDAY_CALIBRATION[2],
    'The orchestra rehearsed the symphony twice.',
    EVERYDAY_CALIBRATION[4],
    'A small boat drifted slowly towards the harbour.',
    'The museum opened a new exhibition about ancient Egypt.',
    'He forgot his umbrella on the crowded bus.',
    'Fresh bread was cooling on the kitchen table.',
    'The committee postponed its decision until March.',
    'Wild horses galloped across the open plain.',
    'The software update fixed a serious security flaw.',
    'Children built a snowman in the school yard.',
    'The chef seasoned the soup with fresh basil.',
    'Scientists observed a comet through the telescope.',
    'The library extended its opening hours in winter.',
    'A gentle breeze carried the scent of pine trees.',
    'The striker scored twice in the second half.',
    CALIBRATION[1],
    'The old bridge was repaired after the flood.',
]

# Held out from DECODER_CALIBRATION (tests/test_int4.py).
DECODER_HELD_OUT = [
    EVERYDAY[0],
    EVERYDAY[1],
    EVERYDAY[2],
    EVERYDAY[3],
    EVERYDAY[4],
    'Farmers harvested the wheat before the rain came.',
    'The doctor recommended more sleep and less coffee.',
    'An old map was found inside the wall.',
    'The team celebrated their victory late into the night.',
    'Prices at the market rose sharply this year.',
]
