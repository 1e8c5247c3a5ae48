// Argument checks shared by the extension modules' bindings (header-only, one copy each).
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <initializer_list>
#include <string>

namespace irouter_bindings {

namespace nb = nanobind;

// Any-dimensional on purpose: a wrong ndim gets a ValueError naming the
// argument and its shape instead of an overload-resolution TypeError.
template <class T>
using In = nb::ndarray<const T, nb::c_contig, nb::device::cpu>;

template <class T>
using Out = nb::ndarray<nb::numpy, T>;

inline std::string shape_of(const nb::ndarray<nb::ro, nb::device::cpu>& a) {
  std::string s = "(";
  for (size_t i = 0; i < a.ndim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(a.shape(i));
  }
  return s + (a.ndim() == 1 ? ",)" : ")");
}

template <class T>
void expect_shape(const In<T>& a, const char* name, std::initializer_list<int64_t> shape,
                  const char* expected) {
  bool ok = a.ndim() == shape.size();
  size_t d = 0;
  for (int64_t s : shape) {
    if (!ok) break;
    ok = s < 0 || static_cast<int64_t>(a.shape(d)) == s;
    ++d;
  }
  if (!ok) {
    nb::ndarray<nb::ro, nb::device::cpu> view(a);
    throw nb::value_error((std::string(name) + " must have shape " + expected + ", got " +
                           shape_of(view))
                              .c_str());
  }
}

}  // namespace irouter_bindings
