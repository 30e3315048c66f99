"""The model card (references/nuclei/model_card.py) says what a count does with the bundle's nucleus size."""
import dataclasses

from cellseg.bundles import load_bundle
from references.nuclei.model_card import card_readme


def test_the_card_names_a_count_size_set_apart_from_the_training_median_and_why():
    """[scale] nucleus_diameter_px is the training data's median nucleus unless [training] count_size says it was set
    apart (a mix of large NuInsSeg nuclei would have the example mosaic resampled): the card then says so, not that it
    is the training data's size."""
    shipped = load_bundle("nuclei")
    training = {k: v for k, v in shipped.card.get("training", {}).items() if k != "count_size"}
    plain = dataclasses.replace(shipped, card={**shipped.card, "training": training})
    assert f"Typical nucleus diameter in the training data: {shipped.nucleus_diameter_px:.1f} px." in card_readme(plain)

    why = "the previous bundle's, not the 22.1 px median of this mix"
    apart = dataclasses.replace(shipped, nucleus_diameter_px=20.25,
                                card={**shipped.card, "training": {**training, "count_size": why}})
    readme = card_readme(apart)
    assert f"Nuclei are brought to 20.2 px in a count without a pixel size (count size: {why})." in readme
    assert "Typical nucleus diameter in the training data" not in readme
