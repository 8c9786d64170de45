"""Reading a task statement: the stub, the entry point, and the examples that become tests."""

from __future__ import annotations

from conclave.agents import parse_task
from conclave.agents.taskspec import statement_tests

STUB = '''from typing import List


def helper(x: int) -> int:
    """Already implemented."""
    return x * 2


def below_zero(operations: List[int]) -> bool:
    """ Detect whether the balance ever falls below zero.
    >>> below_zero([1, 2, 3])
    False
    >>> below_zero([1, 2, -4, 5])
    True
    >>> below_zero(["a\\nb"])
    'escaped'
    """
'''


def test_python_stub_gives_entry_point_signature_and_doctests():
    spec = parse_task(STUB)
    assert spec.stub == STUB
    assert spec.entry_point == "below_zero"  # the stub, not the implemented helper
    assert spec.signature == "def below_zero(operations: List[int]) -> bool:"
    assert [(t.expr, t.expected) for t in spec.tests] == [
        ("below_zero([1, 2, 3])", "False"),
        ("below_zero([1, 2, -4, 5])", "True"),
        # the docstring is read as written: the escape stays inside the string literal
        ('below_zero(["a\\nb"])', "'escaped'"),
    ]
    assert {t.source for t in spec.tests} == {"docstring"}


def test_statement_examples_in_many_notations():
    text = '''
def f(xs, n=0):
    """Do something.
    Examples:
        f([1, 2]) == 3
        f([5]) ➞ 5
        f([])  => 0
        f([2, 2], 1) -> 2 + 2 = 4
        f([7]) returns 7.
        f([8]) should return 8
        f([9])   # returns 9
        f([1]) ==> true
        f(a) => 1
        f([3]) == ""oops"
        f([4]) = 'No' (see above)
    """
'''
    spec = parse_task(text)
    got = [(t.expr, t.expected) for t in spec.tests]
    assert got == [
        ("f([1, 2])", "3"), ("f([5])", "5"), ("f([])", "0"), ("f([2, 2], 1)", "4"),
        ("f([7])", "7"), ("f([8])", "8"), ("f([9])", "9"), ("f([1])", "True"),
        ("f([4])", "'No'"),
    ]  # f(a) has a non-literal argument and ""oops" is a typo: neither becomes a test


def test_doctest_comparisons_without_output_lines():
    spec = parse_task('def g(x):\n    """\n    >>> g(2) == 4\n    >>> g(3) [9]\n    """\n')
    assert [(t.expr, t.expected) for t in spec.tests] == [("g(2)", "4")]


def test_doctest_setup_statements_carry_over():
    spec = parse_task('def h(x):\n    """\n    >>> y = 3\n    >>> h(y)\n    6\n    """\n')
    (test,) = spec.tests
    assert test.setup == "y = 3" and test.expr == "h(y)" and test.expected == "6"


def test_prose_task_with_examples_finds_the_entry_point():
    spec = parse_task("Write a function add(a, b) returning the sum.\n"
                      "Example: add(2, 3) == 5 and add(-1, 1) == 0")
    assert spec.stub is None
    assert spec.entry_point == "add"
    assert [(t.expr, t.expected) for t in spec.tests] == [("add(2, 3)", "5"),
                                                           ("add(-1, 1)", "0")]


def test_fenced_stub_inside_prose():
    spec = parse_task("Please implement:\n```python\ndef sq(x):\n    \"\"\"Square.\n"
                      "    >>> sq(3)\n    9\n    \"\"\"\n```\nThanks")
    assert spec.entry_point == "sq" and spec.stub and spec.stub.startswith("def sq")
    assert [(t.expr, t.expected) for t in spec.tests] == [("sq(3)", "9")]


def test_complete_code_is_not_a_stub_and_prose_without_examples_has_no_tests():
    spec = parse_task("def done(x):\n    return x\n")
    assert spec.stub is None and spec.entry_point == "done"
    spec = parse_task("Write a CLI that greets people.")
    assert spec.stub is None and spec.entry_point is None and spec.tests == []
    assert statement_tests("print(x) == 3") == []  # non-literal argument
