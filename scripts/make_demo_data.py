#!/usr/bin/env python3
"""Generate the llmft SFT demo dataset: instruction following with verifiable constraints.

Every row pairs an everyday request ("Describe a lighthouse.") with one or two
constraints that a program can check exactly (lowercase, word limits, bullet
points, keywords, JSON output, ...).  Completions are assembled from short
hand-written factual sentences per request and transformed to satisfy every
constraint; each completion is verified with ``check()`` before it is written
and the script raises if any fails.

Outputs (the default arguments reproduce the shipped files byte for byte):
    data/demo/sft_train.jsonl   400 rows from 36 requests         (162,845 bytes)
    data/demo/sft_eval.jsonl     60 rows from 6 held-out requests  (24,175 bytes)

Row schema: {"prompt", "completion", "constraints": [{"type": ..., ...}],
"request_id"}.  See data/demo/README.md for the constraint specs.

Regenerate:
    python scripts/make_demo_data.py --seed 0 --out data/demo

Deterministic for a given seed. Answers are checked with llmft's judge (llmft/judges/constraints.py).
"""

import argparse
import json
import math
import random
import re
from pathlib import Path

from llmft.judges.constraints import check, count_words, has_word

# One block per request: a "request_id | request" line, then five sentences.
CONTENT = """
describe_lighthouse | Describe a lighthouse.
A lighthouse is a tall tower that shines a bright light to guide ships at night. Most lighthouses
stand on rocky coasts, islands or harbor entrances. The lamp sits at the top behind a large glass
lens that focuses the beam. Each lighthouse flashes in its own pattern so sailors can identify it.
Today many lighthouses run without a keeper.
describe_honeybee | Describe a honeybee.
A honeybee is a small flying insect with a striped yellow and brown body. Honeybees live in large
colonies ruled by a single queen. Worker bees collect nectar and pollen from flowers. The bees turn
nectar into honey and store it in wax combs. Bee visits to flowers help many crops produce fruit.
describe_desert | Describe a desert.
A desert is a region that receives very little rain each year. Many deserts are hot during the day
and surprisingly cold at night. Sand dunes cover some deserts while others are rocky plains. Plants
like cacti store water in thick stems to survive. Desert animals often hide from the heat and come
out after dark.
describe_library | Describe a public library.
A public library is a building where anyone can borrow books for free. Its shelves hold novels,
magazines, reference works and picture books. Most libraries also lend movies and audiobooks. Many
offer computers, study rooms and free internet access. Librarians help visitors find information
and recommend good reads.
describe_volcano | Describe a volcano.
A volcano is an opening in the crust of the Earth where molten rock escapes. Molten rock is called
magma underground and lava once it reaches the surface. Eruptions can send out ash, gas and glowing
rivers of lava. Over time the cooled lava builds a mountain around the vent. Some volcanoes erupt
often while others stay quiet for centuries.
describe_owl | Describe an owl.
An owl is a bird of prey that hunts mostly at night. Its large forward-facing eyes help it see in
dim light. Owls can turn their heads much farther than humans can. Soft feathers let them fly
almost silently toward their prey. Owls swallow small animals whole and later cough up pellets of
fur and bone.
describe_coral_reef | Describe a coral reef.
A coral reef is an underwater structure built by tiny animals called coral polyps. Reefs grow in
warm, shallow and clear ocean water. Reefs shelter an enormous variety of fish and other sea life.
Many corals get their bright colors from algae living inside them. Reefs also protect coastlines by
breaking the force of waves.
describe_bicycle | Describe a bicycle.
A bicycle is a vehicle with two wheels that a rider moves by pedaling. The pedals turn a chain that
drives the rear wheel. Handlebars let the rider steer and usually hold the brake levers. Gears make
it easier to climb hills or ride fast on flat roads. Bicycles are quiet, cheap to run and good
exercise.
describe_rainforest | Describe a tropical rainforest.
A tropical rainforest is a dense forest that gets heavy rain all year. It stays warm and humid
because it lies near the equator. Tall trees form a thick canopy that blocks most sunlight.
Rainforests are home to more than half of all plant and animal species. The Amazon in South America
is the largest rainforest on Earth.
describe_moon | Describe the Moon.
The Moon is the only natural satellite of the Earth. Its gray surface is covered with craters,
mountains and dark plains of old lava. The Moon has almost no atmosphere so its sky is always
black. It takes about a month to orbit the Earth. The same side of the Moon always faces us.
describe_elephant | Describe an elephant.
An elephant is the largest land animal alive today. It uses its long trunk to breathe, drink, smell
and grab food. Elephants flap their large ears to help them stay cool. Elephants live in close
family herds led by an older female. These animals are known for their strong memory and
intelligence.
describe_castle | Describe a medieval castle.
A medieval castle is a fortified home built for a lord and his soldiers. Thick stone walls and tall
towers protected the people inside. Many castles were surrounded by a deep moat with a drawbridge.
The great hall was used for meals, meetings and feasts. Castles often stood on hills to give a wide
view of the land.
describe_market | Describe a farmers market.
A farmers market is an outdoor market where local growers sell their goods. Stalls offer fresh
fruit, vegetables, eggs, bread and flowers. Much of the produce was picked only a day or two
earlier. Shoppers can talk directly with the people who grew their food. Many markets run on
weekend mornings in town squares or parking lots.
describe_train_station | Describe a busy train station.
A busy train station is full of people hurrying to and from the platforms. Large boards display
departure times and platform numbers. Announcements echo through the hall as trains arrive and
leave. Travelers line up at ticket machines and coffee stands. Station staff help people find the
right train.
explain_sky_blue | Explain why the sky is blue.
Sunlight scatters off air molecules and blue light scatters the most. Sunlight contains every color
of visible light mixed together. Blue light has a short wavelength and scatters much more than red
light. That scattered blue light reaches our eyes from every direction in the sky. At sunset the
light crosses more air, so reds and oranges dominate.
explain_seasons | Explain why Earth has seasons.
Earth has seasons because its axis is tilted relative to its orbit. As Earth circles the Sun, each
hemisphere takes turns leaning toward it. The hemisphere tilted toward the Sun gets more direct
light and longer days. Summer comes to the hemisphere leaning toward the Sun while the other has
winter. Distance from the Sun plays only a minor role.
explain_rainbow | Explain how a rainbow forms.
A rainbow forms when sunlight passes through raindrops in the air. Each drop bends the light as it
enters and leaves. Bending the light splits white sunlight into its separate colors. Light also
reflects off the back of each drop toward the viewer. You see a rainbow when the Sun is behind you
and rain is in front of you.
explain_photosynthesis | Explain photosynthesis in simple terms.
Photosynthesis is how plants make their own food from sunlight. Leaves absorb light using a green
pigment called chlorophyll. The plant combines carbon dioxide from the air with water from its
roots. This process produces sugar for energy and releases oxygen. Nearly all life on Earth depends
on it for food and air.
explain_tides | Explain what causes ocean tides.
Tides are caused mainly by the gravitational pull of the Moon. The Moon pulls the ocean on the near
side of Earth into a bulge. A second bulge forms on the opposite side of the planet. As Earth
rotates, each coastline passes through both bulges. Because of the two bulges, most coastlines see
two high tides every day.
explain_vaccines | Explain how vaccines work.
A vaccine trains the immune system to recognize a specific germ. It contains a harmless piece or
weakened form of that germ. The body responds by making antibodies and memory cells. If the real
germ appears later, the immune system reacts quickly. Vaccination often prevents serious illness or
makes it milder.
explain_recycling | Explain why recycling is useful.
Recycling turns used materials into new products instead of waste. It reduces the amount of trash
sent to landfills. Making goods from recycled material often uses less energy. It also saves raw
resources like trees, metal ore and oil. Recycling works best when items are clean and sorted
correctly.
explain_thunder | Explain what causes thunder.
Thunder is the sound made by a lightning strike. Lightning heats the air around it to extremely
high temperatures. Air heated by lightning expands so quickly that it creates a shock wave. Thunder
can sound like a sharp crack nearby or a long rumble far away. Light travels faster than sound, so
we see the flash before the thunder arrives.
explain_ice_floats | Explain why ice floats on water.
Ice floats because it is less dense than liquid water. When water freezes its molecules lock into
an open crystal pattern. Ice takes up about nine percent more space than the same water as a
liquid. A cup of ice weighs less than a cup of liquid water. Floating ice keeps lakes from freezing
solid in winter.
explain_internet | Explain how the internet works in simple terms.
The internet is a global network that connects millions of computers. Data travels across it in
small chunks called packets. Routers pass each packet along until it reaches the right destination.
Every connected device has an address so the packets know where to go. The receiving computer puts
the packets back together in order.
explain_compound_interest | Explain compound interest.
Compound interest is interest earned on both your savings and past interest. Each period the
interest is added to the balance. The growing balance then earns even more interest in the next
period. Over many years this makes savings grow faster and faster. Starting early gives compounding
more time to work.
explain_leaves_change | Explain why leaves change color in autumn.
Leaves change color because trees stop making green chlorophyll in autumn. Shorter days and cooler
nights signal the tree to shut down its leaves. As the green fades, yellow and orange pigments
become visible. Some trees also produce red pigments from sugars trapped in the leaves. Eventually
the leaves dry out and fall to the ground.
explain_earthquakes | Explain what causes earthquakes.
Earthquakes happen when rock in the crust of the Earth suddenly slips. The outer layer of the
planet is broken into large plates that slowly move. Stress builds up where these plates push or
slide past each other. The sudden slip releases energy as seismic waves that shake the ground. Most
earthquakes happen along the edges of the plates.
explain_exercise_benefits | Explain why regular exercise is good for you.
Regular exercise strengthens the heart and lungs. It helps control weight and builds strong muscles
and bones. Physical activity lowers the risk of diabetes and heart disease. Exercise also improves
mood and reduces stress. People who stay active tend to sleep better at night.
tips_cooking | Give some tips for someone learning to cook.
Start with simple recipes that use only a few ingredients. Read the whole recipe before you turn on
the stove. Taste your food as you cook and adjust the seasoning. Keep your knives sharp, because
dull blades slip more easily. Cook the same dish several times until it feels easy.
tips_sleep | Give some tips for sleeping better.
Keep a regular schedule and go to bed at the same time every night. Keep your bedroom dark, quiet
and cool. Avoid caffeine in the afternoon and evening. Put away phones and screens an hour before
bed. Regular exercise during the day can help you fall asleep faster.
tips_saving_money | Give some tips for saving money.
Track your spending for a month to see where your money goes. Set up an automatic transfer to
savings on payday. Cook at home more often instead of eating out. Wait a day before making any
large purchase. Cancel subscriptions that you rarely use.
tips_public_speaking | Give some tips for public speaking.
Practice your talk out loud several times before the event. Know your opening lines by heart so you
start with confidence. Speak slowly and pause between your main points. Look at different people in
the audience as you talk. Remember that listeners want you to succeed.
tips_houseplants | Give some tips for keeping houseplants healthy.
Check the soil with your finger before watering. Most houseplants die from too much water rather
than too little. Place each plant where it gets the right amount of light. Use pots with drainage
holes so the roots do not rot. Wipe dust off the leaves now and then.
tips_studying | Give some tips for studying effectively.
Study in short focused sessions with breaks in between. Test yourself instead of simply rereading
your notes. Spread your review over several days rather than cramming. Explain the material out
loud as if teaching a friend. Get enough sleep, because memory improves during rest.
tips_running | Give some tips for a beginner runner.
Start slowly and mix short runs with walking breaks. Buy shoes that fit well and suit your stride.
Increase your weekly distance only a little at a time. Warm up before each run and stretch gently
afterward. Rest days matter as much as training days.
tips_remote_work | Give some tips for working from home.
Set up a dedicated workspace away from your bed. Keep regular hours and take a real lunch break.
Get dressed each morning as if you were going to an office. Turn off notifications that pull your
attention away. Step outside for a short walk during the day.
tips_packing | Give some tips for packing for a trip.
Make a packing list a few days before you leave. Choose clothes that mix and match so you need
fewer items. Roll soft clothes to save space and reduce wrinkles. Keep medicine and documents in
your carry-on bag. Leave a little room for things you buy on the way.
tips_meeting | Give some tips for running a good meeting.
Share a clear agenda before the meeting starts. Invite only the people who really need to be there.
Start on time and keep each topic within its slot. Write down decisions and who owns each next
step. End early if the work is done.
tips_email | Give some tips for writing a clear email.
Write a subject line that tells the reader what the email is about. Put your main point or request
in the first sentence. Keep paragraphs short and easy to scan. Check names, dates and attachments
before you send. Read the message once more from the point of view of the reader.
tips_language | Give some tips for learning a new language.
Practice a little every day rather than a lot once a week. Learn the most common words and phrases
first. Listen to music, podcasts and shows in the language. Speak with native speakers even if you
make mistakes. Keep a notebook of new words and review it often.
tips_water | Give some tips for drinking more water.
Carry a reusable water bottle wherever you go. Drink a glass of water with every meal. Add slices
of lemon or cucumber for flavor. Set reminders on your phone if you often forget. Eat foods with
lots of water such as melons and cucumbers.
tips_interview | Give some tips for a job interview.
Research the company and the role before the interview. Prepare short stories that show your skills
in action. Arrive a few minutes early and dress neatly. Listen carefully and take a moment before
answering hard questions. Send a brief thank-you note afterward.
"""

BLOCKED = {  # pairs that are contradictory or whose checks would interfere
    "lowercase": {"uppercase", "json_key"},
    "uppercase": {"json_key"},
    "quoted": {"json_key", "bullets", "starts_with", "ends_with", "sentences"},
    "json_key": {"bullets", "starts_with", "ends_with", "sentences", "min_words"},
    "bullets": {"sentences"},
    "max_words": {"min_words"},
}
STARTS = ["Sure!", "Of course.", "Good question.", "Here is a short answer."]
ENDS = ["Hope this helps!", "Thanks for asking.", "That covers the basics.",
        "Let me know if you want more detail."]
JSON_KEYS = ["answer", "response", "summary", "text"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six"]
STOPWORDS = frozenset("""about after again against almost along also always among another
because before being below between both could during each every first from have into
later least less like many more most much never often only other over rather should since
some still such than that their them then there these they this those through under until
usually very were what when where which while will with would your""".split())
TEMPLATES = {
    "lowercase": ["Write your entire answer in lowercase letters.", "Use no capital letters at all."],
    "uppercase": ["Write your entire answer in capital letters.", "Respond in all caps."],
    "max_words": ["Answer in at most {n} words.", "Keep your answer to {n} words or fewer."],
    "min_words": ["Use at least {n} words.", "Your answer should be at least {n} words long."],
    "bullets": ['Format your answer as exactly {count}, each starting with "- ".',
                'Give exactly {count}, and start each line with "- ".'],
    "include_keyword": ['Include the word "{word}".', 'Make sure to use the word "{word}".'],
    "exclude_word": ['Do not use the word "{word}".', 'Avoid the word "{word}" entirely.'],
    "starts_with": ['Begin your answer with "{phrase}"', 'Start your reply with "{phrase}"'],
    "ends_with": ['End your answer with "{phrase}"', 'Finish with the exact sentence "{phrase}"'],
    "quoted": ["Wrap your entire answer in double quotes.", "Put the whole reply in quotation marks."],
    "json_key": ['Reply with a JSON object that has the answer under the key "{key}".',
                 'Return JSON only: an object whose "{key}" field holds the answer.'],
    "no_commas": ["Do not use any commas.", "Avoid commas completely."],
    "sentences": ["Answer in exactly {count}.", "Write exactly {count}, no more and no less."],
}
TYPES = list(TEMPLATES)  # constraint types, in a fixed order


# ---------------------------------------------------------------- content
def load_requests():
    requests = []
    for line in CONTENT.strip().splitlines():
        if " | " in line:
            rid, request = line.split(" | ")
            requests.append({"id": rid, "request": request, "text": ""})
        else:
            requests[-1]["text"] += " " + line
    for req in requests:
        req["sentences"] = re.split(r"(?<=[.!?])\s+", req.pop("text").strip())
        validate_request(req)
    return requests


def validate_request(req):
    """Content rules the generator relies on (sentence splitting, comma/word filters)."""
    sents = req["sentences"]
    ok = (len(sents) == 5 and all(re.fullmatch(r'[A-Z][^.!?"]*[.!?]', s) for s in sents)
          and "," not in sents[0] and sum("," not in s for s in sents) >= 3
          and keywords(req, sents[0]) and exclude_candidates(req, sents)
          and exclude_candidates(req, [s for s in sents if "," not in s]))
    if not ok:
        raise ValueError(f"content for {req['id']!r} breaks the generator's assumptions")


def keywords(req, text):
    """Distinct content words of ``text`` (lowercased) not already in the request."""
    out = []
    for word in re.findall(r"[a-z]+", text.lower()):
        if len(word) >= 5 and word not in STOPWORDS and word not in out \
                and not has_word(req["request"], word):
            out.append(word)
    return out


def exclude_candidates(req, pool):
    """Words absent from the first sentence, the stock phrases and >= 2 pool sentences."""
    phrases = " ".join(STARTS + ENDS)
    return [w for w in keywords(req, " ".join(pool[1:]))
            if not has_word(pool[0], w) and not has_word(phrases, w)
            and sum(not has_word(s, w) for s in pool) >= 2]


# ---------------------------------------------------------------- generation
def compatible(a, b):
    return a != b and b not in BLOCKED.get(a, ()) and a not in BLOCKED.get(b, ())


def sample_types(rng):
    first = rng.choice(TYPES)
    if rng.random() < 0.35:
        return [first]
    return [first, rng.choice([t for t in TYPES if compatible(first, t)])]


def pick_count(spec, rng, size):
    """How many content sentences to use; fills in bullets/sentences counts."""
    extras = ("starts_with" in spec) + ("ends_with" in spec)
    if "bullets" in spec:
        spec["bullets"]["n"] = rng.randint(2, min(4, size))
        return spec["bullets"]["n"]
    if "sentences" in spec:
        k = rng.randint(1, min(4, size))
        spec["sentences"]["n"] = k + extras
        return k
    if "min_words" in spec:
        return min(size, rng.choice([4, 5]))
    if "max_words" in spec:
        return rng.randint(1, 2)
    return rng.randint(2, min(3, size))


def choose_sentences(req, spec, rng):
    pool = list(req["sentences"])
    if "no_commas" in spec:
        pool = [s for s in pool if "," not in s]
    if "exclude_word" in spec:
        word = rng.choice(exclude_candidates(req, pool))
        spec["exclude_word"]["word"] = word
        pool = [s for s in pool if not has_word(s, word)]
    k = pick_count(spec, rng, len(pool))
    rest = sorted(rng.sample(range(1, len(pool)), k - 1))
    return [pool[0]] + [pool[i] for i in rest]


def render(chosen, spec, rng):
    """Lay out the chosen sentences and apply the formatting constraints."""
    bullets = "bullets" in spec
    sep = "\n" if bullets else " "
    text = sep.join(f"- {s}" for s in chosen) if bullets else sep.join(chosen)
    case = str.lower if "lowercase" in spec else str.upper if "uppercase" in spec else str
    text = case(text)
    if "starts_with" in spec:
        spec["starts_with"]["phrase"] = case(rng.choice(STARTS))
        text = spec["starts_with"]["phrase"] + sep + text
    if "ends_with" in spec:
        spec["ends_with"]["phrase"] = case(rng.choice(ENDS))
        text = text + sep + spec["ends_with"]["phrase"]
    if "quoted" in spec:
        text = f'"{text}"'
    if "json_key" in spec:
        spec["json_key"]["key"] = rng.choice(JSON_KEYS)
        text = json.dumps({spec["json_key"]["key"]: text}, ensure_ascii=False)
    return text


def set_word_limits(spec, text, rng):
    words = count_words(text)
    if "max_words" in spec:
        spec["max_words"]["n"] = 5 * math.ceil((words + rng.randint(0, 6)) / 5)
    if "min_words" in spec:
        spec["min_words"]["n"] = max(5, 5 * ((words - rng.randint(0, 6)) // 5))


def instruction(c, rng):
    noun = {"bullets": "bullet point", "sentences": "sentence"}.get(c["type"])
    count = f"{NUMBERS[c['n']]} {noun}{'' if c['n'] == 1 else 's'}" if noun else ""
    return rng.choice(TEMPLATES[c["type"]]).format(**c, count=count)


def build_row(req, types, rng):
    spec = {t: {"type": t} for t in types}
    chosen = choose_sentences(req, spec, rng)
    if "include_keyword" in spec:
        spec["include_keyword"]["word"] = rng.choice(keywords(req, " ".join(chosen)))
    text = render(chosen, spec, rng)
    set_word_limits(spec, text, rng)
    constraints = [spec[t] for t in types]
    if not all(check(constraints, text)):
        raise ValueError(f"completion fails its constraints: {constraints} {text!r}")
    prompt = " ".join([req["request"]] + [instruction(c, rng) for c in constraints])
    return {"prompt": prompt, "completion": text, "constraints": constraints,
            "request_id": req["id"]}


def make_split(requests, n_rows, rng):
    rows, seen, i = [], set(), 0
    while len(rows) < n_rows:
        if i > 50 * n_rows:
            raise RuntimeError("could not generate enough distinct rows")
        row = build_row(requests[i % len(requests)], sample_types(rng), rng)
        i += 1
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    rng.shuffle(rows)
    return rows


def split_requests(requests, per_kind, rng):
    """Hold out ``per_kind`` requests of each kind (describe/explain/tips) for eval."""
    kinds = list(dict.fromkeys(r["id"].split("_")[0] for r in requests))
    held = []
    for kind in kinds:
        held += rng.sample([r["id"] for r in requests if r["id"].startswith(kind + "_")],
                           per_kind)
    train = [r for r in requests if r["id"] not in held]
    evals = [r for r in requests if r["id"] in held]
    return train, evals


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="data/demo", help="output directory")
    ap.add_argument("--train-rows", type=int, default=400)
    ap.add_argument("--eval-rows", type=int, default=60)
    ap.add_argument("--eval-per-kind", type=int, default=2,
                    help="held-out requests per kind (describe/explain/tips)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    train_reqs, eval_reqs = split_requests(load_requests(), args.eval_per_kind, rng)
    if {r["id"] for r in train_reqs} & {r["id"] for r in eval_reqs}:
        raise RuntimeError("eval requests leak into train")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, reqs, n in [("sft_train.jsonl", train_reqs, args.train_rows),
                          ("sft_eval.jsonl", eval_reqs, args.eval_rows)]:
        write_jsonl(out / name, make_split(reqs, n, rng))
        size = (out / name).stat().st_size
        print(f"{out / name}: {n} rows from {len(reqs)} requests, {size} bytes")


if __name__ == "__main__":
    main()
