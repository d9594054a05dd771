"""The fixed label sets of the two classification-style tasks.

LLaMA-E's product classification and purchase-intent speculation answer with one label from a closed
set, so that accuracy and macro-F1 are well defined and a reply outside the set can be counted as such.
The sets live here, in one place, and everything that writes or checks a label (seed set, teacher
expansion, filters, evaluation) imports them.

* Product categories are the 21 top-level categories of the Google product taxonomy
  (https://www.google.com/basepages/producttype/taxonomy.en-US.txt), spelled exactly as there.
* Purchase intents are a project-defined set of 14 reasons a customer buys, phrased as short noun
  phrases; they cover the co-purchase intentions of IntentionQA at a coarser grain.
"""

from __future__ import annotations

PRODUCT_CATEGORIES: tuple[str, ...] = (
    "Animals & Pet Supplies",
    "Apparel & Accessories",
    "Arts & Entertainment",
    "Baby & Toddler",
    "Business & Industrial",
    "Cameras & Optics",
    "Electronics",
    "Food, Beverages & Tobacco",
    "Furniture",
    "Hardware",
    "Health & Beauty",
    "Home & Garden",
    "Luggage & Bags",
    "Mature",
    "Media",
    "Office Supplies",
    "Religious & Ceremonial",
    "Software",
    "Sporting Goods",
    "Toys & Games",
    "Vehicles & Parts",
)

PURCHASE_INTENTS: tuple[str, ...] = (
    "buying a gift",
    "replacing a worn-out or broken item",
    "upgrading to a better product",
    "stocking up on consumables",
    "completing a set with a complementary item",
    "preparing for an event or trip",
    "starting a new hobby or activity",
    "setting up a new home or room",
    "caring for a baby or child",
    "caring for a pet",
    "improving health or fitness",
    "seasonal or weather need",
    "work or business use",
    "researching before buying",
)

LABEL_SETS: dict[str, tuple[str, ...]] = {
    "product_classification": PRODUCT_CATEGORIES,
    "intent_speculation": PURCHASE_INTENTS,
}
