//! A call's `params`: read field by field, each refusal naming the field
//! with ClaudeBench's validation message.

use serde_json::{Map, Value};

use super::{ApiError, ApiResult};

/// The `params` object of a call, read field by field with exact validation messages.
pub struct Params<'a>(pub(super) &'a Map<String, Value>);

impl<'a> Params<'a> {
    pub(super) fn present(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
    pub(super) fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name)
    }
    pub(super) fn opt_str(&self, name: &str) -> ApiResult<Option<&'a str>> {
        match self.0.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::invalid(name, format!("{name} must be a string"))),
        }
    }
    /// A required string of 1 to `max` characters.
    pub(super) fn string(&self, name: &str, max: usize) -> ApiResult<&'a str> {
        let s = self.opt_str(name)?.ok_or_else(|| ApiError::invalid(name, format!("{name} is required")))?;
        let n = s.chars().count();
        if n == 0 || n > max {
            return Err(ApiError::invalid(name, format!("{name} must be between 1 and {max} characters")));
        }
        Ok(s)
    }
    pub(super) fn opt_string(&self, name: &str, max: usize) -> ApiResult<Option<&'a str>> {
        if self.opt_str(name)?.is_none() {
            return Ok(None);
        }
        self.string(name, max).map(Some)
    }
    pub(super) fn opt_int(&self, name: &str, min: i64, max: i64) -> ApiResult<Option<i64>> {
        match self.0.get(name) {
            None => Ok(None),
            Some(v) => match v.as_i64() {
                Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(ApiError::invalid(name, format!("{name} must be an integer from {min} to {max}"))),
            },
        }
    }
    pub(super) fn opt_object(&self, name: &str) -> ApiResult<Option<&'a Map<String, Value>>> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(_) => Err(ApiError::invalid(name, format!("{name} must be an object"))),
        }
    }
    pub(super) fn opt_enum<T>(
        &self,
        name: &str,
        parse: impl Fn(&str) -> Option<T>,
        allowed: &str,
    ) -> ApiResult<Option<T>> {
        match self.opt_str(name)? {
            None => Ok(None),
            Some(s) => {
                parse(s).map(Some).ok_or_else(|| ApiError::invalid(name, format!("{name} must be one of {allowed}")))
            }
        }
    }
}

/// Params must be an object; absent or null means `{}`.
pub fn params_object(params: Value) -> ApiResult<Map<String, Value>> {
    match params {
        Value::Null => Ok(Map::new()),
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::InvalidParams { validation: "params must be an object".into(), field: None }),
    }
}
